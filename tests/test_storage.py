"""Storage building blocks against a real S3 endpoint (moto's server) and the local filesystem: encryption on
every write, atomic/conditional small objects, the run claim, the commit order, the ledger and the reports."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from labelnext.ops.io import storage
from labelnext.pipelines import ledger
from labelnext.ops.embed.cache import EmbeddingCache, model_key
from labelnext.ops.io.objects import LocalObjects, PreconditionFailed
from labelnext.ops.io.read import id_hash
from labelnext.pipelines.run_lock import RunClaim, RunLocked
from labelnext.ops.io.s3 import S3Settings
from labelnext.pipelines.commit import MANIFEST, RunWriter
from labelnext.pipelines.config import EmbedConfig, RunConfig, StorageConfig
from labelnext.pipelines.report.html import render_html
from labelnext.pipelines.report.terminal import load_run_report
from tests.s3_fixtures import s3_bucket, s3_endpoint, s3_env, store_root  # noqa: F401 (fixtures)

SSE_CASES = [
    (StorageConfig(sse="AES256"), {"ServerSideEncryption": "AES256"}),
    (StorageConfig(sse="aws:kms", kms_key_id="alias/labelnext"),
     {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/labelnext"}),
]


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _encryption(client, bucket: str, key: str) -> dict:
    head = client.head_object(Bucket=bucket, Key=key)
    return {k: head[k] for k in ("ServerSideEncryption", "SSEKMSKeyId") if k in head}


# -- settings and filesystems -------------------------------------------------------------------------
def test_settings_come_from_the_standard_aws_environment_with_config_overrides(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env-endpoint:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert S3Settings.from_config(StorageConfig()).endpoint_url == "http://env-endpoint:9000"
    assert S3Settings.from_config(StorageConfig()).region == "eu-west-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    assert S3Settings.from_config(StorageConfig()).endpoint_url == "http://s3-only:9000"
    over = S3Settings.from_config(StorageConfig(endpoint_url="http://cfg:1", region="ap-south-1"))
    assert (over.endpoint_url, over.region) == ("http://cfg:1", "ap-south-1")


def test_credentials_never_travel_with_the_filesystem_or_the_config(s3_env, monkeypatch):
    secret = "sekret-" + "x9q" * 6
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    for cfg in (StorageConfig(), StorageConfig(sse="AES256")):
        fs, _ = storage.filesystem_for("s3://bucket/prefix", cfg)
        assert secret.encode() not in pickle.dumps(fs)  # what Ray ships to workers
        assert secret not in json.dumps(cfg.model_dump(mode="json"))
        assert secret.encode() not in pickle.dumps(S3Settings.from_config(cfg))


@pytest.mark.parametrize("cfg, expected", SSE_CASES, ids=["sse-s3", "sse-kms"])
def test_every_write_path_carries_server_side_encryption(cfg, expected, s3_bucket, s3_env):
    fs, root = storage.filesystem_for(f"s3://{s3_bucket}/out", cfg)
    objects = storage.objects_for(f"s3://{s3_bucket}/out", cfg)
    table = pa.table({"doc_id": ["a", "b", "c"], "x": [1, 2, 3]})
    storage.write_parquet(fs, f"{root}/single/part-0.parquet", table)
    pads.write_dataset(table, f"{root}/dataset", filesystem=fs, format="parquet")  # what Ray Data's writer calls
    pq.write_to_dataset(table, f"{root}/partitioned", filesystem=fs, partition_cols=["x"])
    fs.copy_file(f"{root}/single/part-0.parquet", f"{root}/copied.parquet")
    fs.move(f"{root}/copied.parquet", f"{root}/moved.parquet")
    storage.write_json(objects, f"{root}/small.json", {"a": 1})
    objects.put(f"{root}/claim.json", b"{}", if_absent=True)
    client = _client(s3_env)
    keys = _keys(client, s3_bucket, "out/")
    assert len(keys) == 8 and "out/copied.parquet" not in keys
    for key in keys:
        assert _encryption(client, s3_bucket, key) == expected, key
    assert pq.read_table(f"{root}/moved.parquet", filesystem=fs).equals(table)
    # Deletes leave no unencrypted "folder" marker objects behind.
    objects.delete_prefix(f"{root}/partitioned")
    fs.delete_file(f"{root}/single/part-0.parquet")
    assert not [k for k in _keys(client, s3_bucket, "out/") if k.endswith("/") or "partitioned" in k or "single" in k]


def test_large_objects_go_multipart_with_encryption(s3_bucket, s3_env):
    fs, root = storage.filesystem_for(f"s3://{s3_bucket}/big", StorageConfig(sse="AES256"))
    blob = np.random.default_rng(0).integers(0, 255, 9 * 1024 * 1024, dtype=np.uint8).tobytes()
    with fs.open_output_stream(f"{root}/blob.bin") as out:
        out.write(blob)
    head = _client(s3_env).head_object(Bucket=s3_bucket, Key="big/blob.bin")
    assert head["ServerSideEncryption"] == "AES256" and "-" in head["ETag"]  # a multipart ETag
    with fs.open_input_stream(f"{root}/blob.bin") as fh:
        assert fh.read() == blob


def test_unsupported_scheme_is_an_error():
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        storage.filesystem_for("gs://bucket/x", StorageConfig())


# -- small objects: atomic and conditional writes -----------------------------------------------------
def test_conditional_create_and_compare_and_swap(store_root):
    store, root = store_root
    path = f"{root}/dir/claim.json"
    assert store.get(path) is None
    tag = store.put(path, b"one", if_absent=True)
    with pytest.raises(PreconditionFailed):
        store.put(path, b"two", if_absent=True)
    new_tag = store.put(path, b"three", if_tag=tag)
    with pytest.raises(PreconditionFailed):
        store.put(path, b"four", if_tag=tag)  # the version we read is gone
    assert store.get(path).data == b"three" and store.get(path).tag == new_tag
    store.put(f"{root}/dir/sub/x", b"x")
    store.delete_prefix(f"{root}/dir")
    assert store.get(path) is None and store.get(f"{root}/dir/sub/x") is None


def test_local_writes_leave_no_temporary_files(tmp_path):
    fs, root = storage.filesystem_for(str(tmp_path), StorageConfig())
    storage.write_parquet(fs, f"{root}/a/part-0.parquet", pa.table({"x": [1]}))
    storage.write_json(LocalObjects(), f"{root}/a/m.json", {"x": 1})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["m.json", "part-0.parquet"]


# -- the run claim --------------------------------------------------------------------------------------
class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _claim(store_root, clock=None, timeout=300.0) -> RunClaim:
    store, root = store_root
    return RunClaim(store, f"{root}/_locks/run.json", "run_date=2026-11-25/run_id=r", timeout, clock or Clock())


def test_second_attempt_fails_while_the_first_is_alive(store_root):
    first, second = _claim(store_root), _claim(store_root)
    first.acquire()
    with pytest.raises(RunLocked, match=rf"already being written by attempt {first.attempt}"):
        second.acquire()
    first.refresh()  # the holder is unaffected
    first.release()
    second.acquire()  # released claims are free at once
    second.release()


def test_a_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(store_root):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    crashed = _claim(store_root)
    crashed.pid = int(dead.stdout)
    crashed.acquire()
    rerun = _claim(store_root)
    rerun.acquire()
    assert rerun.host == crashed.host == socket.gethostname()


def test_a_lost_reply_to_our_own_create_is_not_a_conflict(store_root):
    claim = _claim(store_root)
    store, root = store_root
    store.put(claim.path, claim._holder().to_bytes(), if_absent=True)  # as if the reply had been lost
    claim.acquire()
    claim.refresh()


def test_rerun_clears_the_old_attempt_manifest_first(tmp_path):
    cfg = RunConfig()
    layout = storage.RunLayout.create(str(tmp_path), "2026-11-25", "r", cfg.storage)
    storage.write_json(layout.objects, layout.path(MANIFEST), {"status": "committed"})
    storage.write_parquet(layout.fs, layout.path("selected/part-old.parquet"), pa.table({"doc_id": ["a"]}))
    ledger.write_entry(layout, pa.table({"doc_id": ["a"]}), "old")
    writer = RunWriter(layout, cfg)
    writer.begin()
    try:
        assert os.path.exists(layout.path(MANIFEST))  # still readable until the new outputs are written
        writer.clear_previous()
        assert not os.path.exists(layout.prefix)
        assert not os.path.exists(ledger.entry_dir(layout))
    finally:
        writer.close()
    assert not os.path.exists(layout.claim_path)


# -- ledger, exclusions, previous run ------------------------------------------------------------------
def _commit_fake_run(output: storage.OutputRoot, run_date: str, run_id: str, ids: list[str],
                     committed: bool = True, committed_at: str = "2026-11-25T00:00:00") -> None:
    layout = output.run(run_date, run_id)
    entry = ledger.write_entry(layout, pa.table({"doc_id": pa.array(ids)}), "attempt1")
    storage.write_parquet(layout.fs, layout.path("centroids.parquet"), pa.table({
        "cluster_id": pa.array([0, 1], pa.int32()), "size": pa.array([1, 1], pa.int64()),
        "centroid": pa.array([[1.0, 0.0], [0.0, 1.0]], pa.list_(pa.float32(), 2))}))
    if committed:
        storage.write_json(output.objects, layout.path(MANIFEST), {"committed_at": committed_at, "ledger": entry})


@pytest.fixture(params=["local", "s3"])
def output_root(request, tmp_path) -> storage.OutputRoot:
    if request.param == "local":
        return storage.OutputRoot.open(str(tmp_path / "out"), StorageConfig())
    bucket = request.getfixturevalue("s3_bucket")
    return storage.OutputRoot.open(f"s3://{bucket}/out", StorageConfig(sse="AES256"))


def test_ledger_counts_only_committed_runs_dated_before_the_current_one(output_root):
    _commit_fake_run(output_root, "2026-11-23", "a", ["d1", "d2"])
    _commit_fake_run(output_root, "2026-11-24", "crashed", ["d3"], committed=False)
    _commit_fake_run(output_root, "2026-11-25", "me", ["d4"])
    # A later night, or another run of the same night, must not change what a rerun of this night selects.
    _commit_fake_run(output_root, "2026-11-26", "next", ["d5"])
    _commit_fake_run(output_root, "2026-11-25", "other", ["d6"])
    # An attempt that lost its claim may still write an entry; only the one the manifest names counts.
    ledger.write_entry(output_root.run("2026-11-23", "a"), pa.table({"doc_id": ["zombie"]}), "attempt2")
    hashes, runs = ledger.ledger_hashes(output_root, ledger.RunRef("2026-11-25", "me"))
    assert runs == [ledger.RunRef("2026-11-23", "a")]
    assert np.array_equal(hashes, np.unique(id_hash(["d1", "d2"])))
    assert ledger.committed_runs(output_root) == [ledger.RunRef("2026-11-23", "a"), ledger.RunRef("2026-11-25", "me"),
                                                  ledger.RunRef("2026-11-25", "other"),
                                                  ledger.RunRef("2026-11-26", "next")]
    later, runs = ledger.ledger_hashes(output_root, ledger.RunRef("2026-11-27", "backfill"))
    assert len(runs) == 4 and np.array_equal(later, np.unique(id_hash(["d1", "d2", "d4", "d5", "d6"])))


def test_previous_run_is_the_latest_committed_one_before(output_root):
    current = ledger.RunRef("2026-11-25", "today")
    assert ledger.previous_run(output_root, current) is None
    _commit_fake_run(output_root, "2026-11-23", "old", ["a"])
    _commit_fake_run(output_root, "2026-11-24", "early", ["b"], committed_at="2026-11-24T01:00:00")
    _commit_fake_run(output_root, "2026-11-24", "late", ["c"], committed_at="2026-11-24T05:00:00")
    _commit_fake_run(output_root, "2026-11-26", "future", ["d"])
    _commit_fake_run(output_root, "2026-11-24", "uncommitted", ["e"], committed=False)
    prev = ledger.previous_run(output_root, current)
    assert prev == ledger.RunRef("2026-11-24", "late")
    assert ledger.load_centroids(output_root, prev).shape == (2, 2)


def test_user_exclusions_accept_string_or_integer_ids_and_name_a_missing_column(tmp_path):
    pq.write_table(pa.table({"doc_id": ["x", "y", None]}), tmp_path / "s.parquet")
    pq.write_table(pa.table({"id": pa.array([7, 8], pa.int64())}), tmp_path / "i.parquet")
    assert np.array_equal(ledger.user_hashes(str(tmp_path / "s.parquet"), "doc_id", StorageConfig()),
                          np.unique(id_hash(["x", "y"])))
    assert np.array_equal(ledger.user_hashes(str(tmp_path / "i.parquet"), "id", StorageConfig()),
                          np.unique(id_hash(["7", "8"])))
    with pytest.raises(ledger.ExclusionError, match="missing column 'doc_id'"):
        ledger.user_hashes(str(tmp_path / "i.parquet"), "doc_id", StorageConfig())


def test_drop_excluded_keeps_everything_else():
    ids = ["a", "b", "c", "d"]
    table = pa.table({"doc_id": ids, "_id_hash": pa.array(id_hash(ids))})
    out = ledger.drop_excluded(table, np.unique(id_hash(["b", "d", "zzz"])))
    assert out.column("doc_id").to_pylist() == ["a", "c"]
    assert ledger.drop_excluded(table, np.empty(0, np.uint64)).num_rows == 4


# -- embedding cache files ---------------------------------------------------------------------------
def test_cache_files_are_keyed_by_content_and_model(tmp_path):
    output = storage.OutputRoot.open(str(tmp_path), StorageConfig())
    cache = EmbeddingCache(output, EmbedConfig())
    assert "model=bundled-all-MiniLM-L6-v2-seq256" in cache.dir
    assert model_key(EmbedConfig(max_seq_length=128)) != model_key(EmbedConfig())
    assert model_key(EmbedConfig(dtype="float16")) != model_key(EmbedConfig()) == model_key(EmbedConfig(dtype="auto"))
    batch = {"doc_id": np.array(["a", "b"], dtype=object), "text": np.array(["x", "y"], dtype=object),
             "_text_hash": np.array(["h1", "h2"], dtype=object), "embedding": np.eye(2, 3, dtype=np.float32)}
    out = cache.write(dict(batch))
    assert "_text_hash" not in out and out["embedding"].shape == (2, 3)
    cache.write(dict(batch))  # a retried task rewrites the same file
    (path,) = cache.files()
    table = pq.read_table(path)
    assert table.column_names == ["doc_id", "text_hash", "embedding"]
    assert np.allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), np.eye(2, 3))


# -- reports --------------------------------------------------------------------------------------------
def _cost(savings: float | None = 12.5, big: float | None = 19.4) -> dict:
    return {
        "stages": {"read": {"wall_s": 1.0, "docs": 10, "cpu_s": 2.0, "accelerator_s": 0.0, "usd": 0.001},
                   "embed": {"wall_s": 2.0, "docs": 4, "reused": 6, "cpu_s": 2.0, "accelerator_s": 0.0,
                             "usd": 0.002}},
        "total_usd": 0.003, "total_wall_s": 3.0,
        "counterfactuals": {"full_pass_scoring_model_usd": 0.0375 if savings else None,
                            "full_pass_70b_usd": big, "annotation_usd": 1.0},
        "savings_ratio": savings, "headline": "labelnext <scored> 4 of 10 documents",
    }


def test_html_report_is_self_contained_with_table_chart_and_sentence():
    page = render_html(_cost(), {"input_docs": 10, "excluded_docs": 2}, "r1", "2026-11-25")
    assert page.startswith("<!doctype html>") and "<svg" in page and "<table" in page
    assert "12.5x less" in page and "$0.0375" in page and "$19.40" in page
    assert "&lt;scored&gt;" in page and "<scored>" not in page  # escaped
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "<script" not in page
    assert "excluded docs" in page
    unscored = render_html(_cost(None), {}, "r2", "2026-11-25")
    assert "No document went through the LLM" in unscored and "6,466.7x less" in unscored
    assert "n/a" in unscored  # the scoring model's bar: its throughput was never measured
    nothing = render_html(_cost(None, big=None), {}, "r3", "2026-11-25")
    assert "no full-pass comparison" in nothing


def test_report_reads_only_committed_runs_from_s3(s3_bucket, s3_env):
    uri = f"s3://{s3_bucket}/out/run_date=2026-11-25/run_id=r"
    output = storage.OutputRoot.open(f"s3://{s3_bucket}/out", StorageConfig())
    layout = output.run("2026-11-25", "r")
    storage.write_json(output.objects, layout.path("cost_report.json"), _cost())
    with pytest.raises(FileNotFoundError, match="not committed"):
        load_run_report(uri)
    storage.write_json(output.objects, layout.path(MANIFEST), {"status": "committed"})
    assert load_run_report(uri)["savings_ratio"] == 12.5
