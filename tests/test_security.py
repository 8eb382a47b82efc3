"""Credentials never leave the AWS credential chain, and output keys are built only from validated parts."""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from labelnext.ops.io import storage
from labelnext.pipelines.config import StorageConfig
from tests.cli_run import QUICK, labelnext
from tests.s3_fixtures import s3_bucket, s3_endpoint, s3_env  # noqa: F401 (fixtures)

SECRET = "lnxSecretKey-do-not-leak-7f3a9c0e"
TOKEN = "lnxSessionToken-do-not-leak-52b1e0d4"


def _leaks(data: bytes) -> list[str]:
    return [name for name, value in (("secret", SECRET), ("token", TOKEN)) if value.encode() in data]


def _parquet_text(data: bytes) -> bytes:
    """Every value of a Parquet object as text, so compression cannot hide a leaked string."""
    return str(pq.read_table(io.BytesIO(data)).to_pylist()).encode()


@pytest.mark.slow
def test_credentials_appear_in_no_output_report_or_log(tmp_path, s3_bucket, s3_env):
    import boto3

    from labelnext.pipelines.sample_corpus import write_sample_corpus

    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    corpus = write_sample_corpus(tmp_path / "corpus.parquet", n_docs=80, seed=11)
    client.upload_file(str(corpus), s3_bucket, "corpus/part-0.parquet")
    # Ray's session logs go to a folder of our own (short: Ray puts unix sockets under it).
    ray_tmp = Path(tempfile.mkdtemp(prefix="lnx"))
    env = {"AWS_ACCESS_KEY_ID": "AKIALNXTESTKEY", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN,
           "RAY_TMPDIR": str(ray_tmp)}
    try:
        run = labelnext("run", "--corpus", f"s3://{s3_bucket}/corpus", "--output", f"s3://{s3_bucket}/out",
                        "--budget", "6", "--run-id", "sec", "--run-date", "2026-11-25", "-v", *QUICK, env=env)
        assert run.returncode == 0, run.stderr[-4000:]
        report = labelnext("report", f"s3://{s3_bucket}/out/run_date=2026-11-25/run_id=sec", env=env)
        assert report.returncode == 0, report.stderr[-2000:]
        for proc in (run, report):
            assert not _leaks((proc.stdout + proc.stderr).encode())

        pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="out/")
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        assert any(k.endswith("manifest.json") for k in keys) and any(k.endswith("cost_report.json") for k in keys)
        for key in keys:
            data = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
            assert not _leaks(data), key
            if key.endswith(".parquet"):
                assert not _leaks(_parquet_text(data)), key

        logs = [p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_socket()]
        assert logs, "Ray wrote no session files under RAY_TMPDIR"
        for path in logs:
            assert not _leaks(path.read_bytes()), path.relative_to(ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# -- run ids and dates: only validated components become keys --------------------------------------------------

ESCAPES = ["../x", "..", ".", "", "a/b", "a\\b", "/abs", "x/../../y", "~", ".hidden", "a b", "a\x00b", "é", "x" * 129]


@pytest.mark.parametrize("run_id", ESCAPES)
def test_run_id_that_could_escape_the_output_prefix_is_rejected(tmp_path, run_id):
    with pytest.raises(ValueError, match="invalid run id"):
        storage.RunLayout.create(str(tmp_path), "2026-11-25", run_id, StorageConfig())


@pytest.mark.parametrize("run_date", ["../2026-11-25", "2026-11-25/..", "2026-11-25/x", "", "2026-13-01", "20261125",
                                      "2026-11-25\n", "2026-11-25 "])
def test_run_date_must_be_a_plain_iso_date(tmp_path, run_date):
    with pytest.raises(ValueError, match="invalid run date"):
        storage.RunLayout.create(str(tmp_path), run_date, "ok", StorageConfig())


def test_run_id_with_a_trailing_newline_is_rejected():
    with pytest.raises(ValueError, match="invalid run id"):
        storage.validate_run_id("run\n")


def test_valid_run_stays_under_the_output_prefix(tmp_path):
    layout = storage.RunLayout.create(str(tmp_path / "out"), "2026-11-25", "nightly-1.2_b", StorageConfig())
    root = str((tmp_path / "out").resolve())
    assert layout.prefix == f"{root}/run_date=2026-11-25/run_id=nightly-1.2_b"
    assert Path(layout.path("selected/part-0.parquet")).resolve().is_relative_to(root)
