"""Faults during a run: killed Ray actors, flaky and dead S3. The run either commits correctly or fails
with one line naming the URI, and never leaves a manifest for a run that did not finish.

(A crash between the data write and the manifest, then a rerun, is covered by the storage tests.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from tests.cli_run import QUICK, REPO, cli_args, cli_env, error_line, labelnext, manifest, run_dir, selected_ids
from tests.flaky_proxy import FlakyProxy
from tests.s3_fixtures import s3_bucket, s3_endpoint, s3_env  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

RUN = ("--budget", "8", "--run-date", "2026-11-25", *QUICK)
# A rule that scores with the LLM, so the run has score actors to kill (the default cold start has none).
LLM_RUN = (*RUN, "--set", "select.rule=typical_uncertain")


SMALL_CORPUS = {"n_docs": 120, "seed": 5}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from labelnext.pipelines.sample_corpus import write_sample_corpus

    return write_sample_corpus(tmp_path_factory.mktemp("faults") / "corpus.parquet", **SMALL_CORPUS)


def _busy_actor(root: psutil.Process, name: str):
    """A Ray Data actor of this run (a descendant of the CLI) that is executing a batch right now."""
    for proc in root.children(recursive=True):
        try:
            title = " ".join(proc.cmdline()).strip()
        except psutil.Error:
            continue
        # Ray titles a busy actor process ``ray::MapWorker(...Embedder...).submit``.
        if title.startswith("ray::MapWorker(") and name in title and title.endswith(".submit"):
            return proc
    return None


def _kill_busy_actors(pid: int, names: list[str], killed: list[str], timeout: float = 400) -> None:
    """SIGKILL one busy actor per name, in order, while the run goes on."""
    root = psutil.Process(pid)
    deadline = time.monotonic() + timeout
    for name in names:
        while time.monotonic() < deadline and root.is_running():
            victim = _busy_actor(root, name)
            if victim is not None:
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(name)
                break
            time.sleep(0.05)


GOLDEN = REPO / "tests" / "golden" / "faults_selection.json"


def calm_run_args(corpus, out) -> tuple[str, ...]:
    return ("run", "--corpus", str(corpus), "--output", str(out), "--run-id", "r", *LLM_RUN)


def test_killed_embed_and_score_actors_are_restarted_and_the_selection_is_unchanged(small_corpus, tmp_path):
    """The killed run selects what a calm run of the same corpus and config selects: ``GOLDEN`` records the calm
    run (``python -m tests.test_faults`` reruns it and rewrites the file; a change meant to alter the selection
    rewrites it in the same commit)."""
    calm = json.loads(GOLDEN.read_text())
    proc = subprocess.Popen(
        cli_args(*calm_run_args(small_corpus, tmp_path / "killed"),
                 "--set", "embed.batch_size=8"),  # several embed batches, so the kill lands mid-stage
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    killed: list[str] = []
    killer = threading.Thread(target=_kill_busy_actors, args=(proc.pid, ["Embedder", "Score"], killed), daemon=True)
    killer.start()
    stdout, stderr = proc.communicate(timeout=600)
    killer.join(timeout=5)

    assert killed == ["Embedder", "Score"], f"the test did not get to kill both actors: {killed}\n{stderr[-3000:]}"
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    killed_run = run_dir(tmp_path / "killed", "r")
    assert manifest(killed_run)["status"] == "committed"
    assert selected_ids(killed_run) == calm["selected_ids"]
    assert manifest(killed_run)["counts"] == calm["counts"]


def record_calm_run(out) -> dict:
    """Run the calm run and return what ``GOLDEN`` records."""
    from labelnext.pipelines.sample_corpus import write_sample_corpus

    corpus = write_sample_corpus(out / "corpus.parquet", **SMALL_CORPUS)
    proc = labelnext(*calm_run_args(corpus, out / "calm"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_dir(out / "calm", "r")
    return {"made_by": "a calm `labelnext run` of the small corpus with LLM_RUN (python -m tests.test_faults)",
            "corpus": f"write_sample_corpus({', '.join(f'{k}={v}' for k, v in SMALL_CORPUS.items())})",
            "selected_ids": selected_ids(run), "counts": manifest(run)["counts"]}


# -- S3: transient errors are retried, permanent ones fail the run with the URI and leave no manifest --------

def _s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _keys(client, bucket: str, prefix: str = "") -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture
def s3_corpus(small_corpus, s3_bucket, s3_env) -> str:
    _s3(s3_env).upload_file(str(small_corpus), s3_bucket, "corpus/part-0.parquet")
    return f"s3://{s3_bucket}/corpus"


def test_transient_s3_errors_are_retried_and_the_run_commits(s3_corpus, s3_bucket, s3_env):
    output = f"s3://{s3_bucket}/out"
    with FlakyProxy(s3_env, fail_rate=0.15, statuses=(500, 503), max_consecutive=2, seed=7) as proxy:
        proc = labelnext("run", "--corpus", s3_corpus, "--output", output, "--run-id", "flaky", *RUN,
                         env={"AWS_ENDPOINT_URL": proxy.url})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert proxy.failed >= 3, (proxy.failed, proxy.forwarded)  # the faults really happened

    client = _s3(s3_env)  # check what landed, bypassing the proxy
    prefix = "out/run_date=2026-11-25/run_id=flaky/"
    stored = _keys(client, s3_bucket, prefix)
    committed = json.loads(client.get_object(Bucket=s3_bucket, Key=prefix + "manifest.json")["Body"].read())
    assert committed["status"] == "committed" and committed["counts"]["selected"] == 8
    for entry in committed["files"]:
        assert stored[prefix + entry["path"]] == entry["bytes"], entry["path"]


def test_permanent_s3_error_mid_write_fails_with_the_uri_and_leaves_no_manifest(s3_corpus, s3_bucket, s3_env):
    output = f"s3://{s3_bucket}/out"
    # Everything works until the run writes its selection; from then on that prefix always answers 503.
    with FlakyProxy(s3_env, fail_rate=1.0, statuses=(503,), max_consecutive=None, only="/selected/") as proxy:
        proc = labelnext("run", "--corpus", s3_corpus, "--output", output, "--run-id", "dead", *RUN,
                         env={"AWS_ENDPOINT_URL": proxy.url})
    assert proxy.failed >= 2  # retried before giving up
    line = error_line(proc)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert line.startswith("error:") and s3_bucket in line and "selected" in line, line
    assert any(reason in line.lower() for reason in ("slow_down", "slowdown", "reduce your request rate")), line
    assert not [k for k in _keys(_s3(s3_env), s3_bucket, "out/") if k.endswith("manifest.json")]


def test_missing_bucket_fails_fast_with_the_uri(small_corpus, s3_env):
    proc = labelnext("run", "--corpus", str(small_corpus), "--output", "s3://lnx-no-such-bucket/out",
                     "--run-id", "nobucket", *RUN)
    line = error_line(proc)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert line.startswith("error:") and "lnx-no-such-bucket" in line, line
    assert "embed:" not in proc.stderr  # failed before any compute


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_text(json.dumps(record_calm_run(Path(tmp)), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
