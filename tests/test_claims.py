"""Run claims under races: store-clock expiry, PID namespaces, conditional release, a stalled attempt whose
claim was taken over, and the claim timeout checked against the S3 retry sequence at load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labelnext.ops.io import storage
from labelnext.ops.io.objects import LocalObjects, PreconditionFailed
from labelnext.pipelines.commit import MANIFEST, RunWriter
from labelnext.pipelines.config import ConfigError, RunConfig, load_config
from labelnext.pipelines.run_lock import ClaimLost, Holder, RunClaim, RunLocked
from tests.cli_run import QUICK, REPO, cli_args, cli_env, error_line, manifest, run_dir
from tests.s3_fixtures import s3_bucket, s3_endpoint, s3_env, store_root  # noqa: F401 (fixtures)

LABEL = "run_date=2026-11-25/run_id=r"


def _claim(store_root, timeout: float = 300.0, clock=time.time) -> RunClaim:
    store, root = store_root
    return RunClaim(store, f"{root}/_locks/run.json", LABEL, timeout, clock)


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_claimant_whose_clock_runs_ahead_cannot_expire_a_live_claim(store_root):
    holder = _claim(store_root)
    holder.host = "another-host"  # only the claim's age can make it abandoned
    holder.acquire()
    skewed = _claim(store_root, clock=lambda: time.time() + 3600)  # an hour ahead of the holder
    with pytest.raises(RunLocked, match="already being written"):
        skewed.acquire()
    holder.refresh()
    holder.release()


def test_a_claim_not_renewed_for_the_timeout_by_the_store_clock_is_taken_over(store_root):
    stale = _claim(store_root, timeout=1.0)
    stale.host = "another-host"
    stale.acquire()
    with pytest.raises(RunLocked):
        _claim(store_root, timeout=1.0).acquire()
    time.sleep(3.0)  # S3 stamps LastModified and Date to the second
    fresh = _claim(store_root, timeout=1.0)
    fresh.acquire()
    with pytest.raises(ClaimLost, match="took over"):
        stale.refresh()
    stale.release()  # does not delete the new holder's claim
    store, root = store_root
    assert Holder.parse(store.get(f"{root}/_locks/run.json").data).attempt == fresh.attempt
    fresh.release()
    assert store.get(f"{root}/_locks/run.json") is None


def test_a_dead_holder_is_taken_over_at_once_only_in_the_same_pid_namespace(store_root):
    store, root = store_root
    crashed = _claim(store_root)
    crashed.pid = _dead_pid()
    other_ns = Holder(crashed.attempt, crashed.host, crashed.pid, crashed.started_at, time.time(),
                      crashed.boot_id, "pid:[1]")  # a container with host networking: same hostname, own pids
    store.put(crashed.path, other_ns.to_bytes(), if_absent=True)
    with pytest.raises(RunLocked, match="already being written"):
        _claim(store_root).acquire()
    store.delete(crashed.path)
    crashed.acquire()  # same host, boot and namespace: the dead pid is checkable
    rerun = _claim(store_root)
    rerun.acquire()
    assert Holder.parse(store.get(crashed.path).data).attempt == rerun.attempt
    rerun.release()


class _TakeoverBeforeDelete:
    """A store where another attempt's claim lands between our last read and our delete."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def delete(self, path, **kwargs):
        self.inner.put(path, Holder("other", "h", 1, "t", 0.0).to_bytes())
        return self.inner.delete(path, **kwargs)


def test_release_deletes_only_our_own_version_of_the_claim(store_root):
    store, root = store_root
    claim = RunClaim(_TakeoverBeforeDelete(store), f"{root}/_locks/run.json", LABEL, 300.0)
    claim.acquire()
    claim.release()
    assert Holder.parse(store.get(claim.path).data).attempt == "other"


def test_conditional_delete(store_root):
    store, root = store_root
    path = f"{root}/x.json"
    tag = store.put(path, b"one")
    store.put(path, b"two")
    with pytest.raises(PreconditionFailed):
        store.delete(path, if_tag=tag)
    store.delete(path, if_tag=store.get(path).tag)
    assert store.get(path) is None
    with pytest.raises(PreconditionFailed):
        store.delete(path, if_tag=tag)  # gone: not ours to delete either


# -- the writer: every destructive step proves the claim; the manifest lists what this attempt wrote ------------
def _age(path: str, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def _layout(tmp_path, cfg: RunConfig):
    return storage.RunLayout.create(str(tmp_path), "2026-11-25", "r", cfg.storage)


REPORT = {"stages": {"read": {"wall_s": 1.0, "docs": 1, "usd": 0.0}}, "total_usd": 0.0, "counterfactuals": {},
          "savings_ratio": None, "headline": "h"}


def test_a_stalled_writer_whose_claim_was_taken_over_deletes_and_commits_nothing(tmp_path):
    cfg = RunConfig()
    layout = _layout(tmp_path, cfg)
    stalled = RunWriter(layout, cfg)
    stalled.claim.acquire()  # no heartbeat: it is stalled
    _age(layout.claim_path, cfg.storage.lock_timeout_s + 1)
    other = RunWriter(layout, cfg)
    other.begin()
    other._write(other._part("selected"), pa.table({"doc_id": ["a"]}))
    committed = other.commit(REPORT, {"selected": 1})
    for step in (stalled.clear_previous, lambda: stalled.commit(REPORT, {"selected": 0})):
        with pytest.raises(ClaimLost, match="took over the claim"):
            step()
    assert json.loads(open(layout.path(MANIFEST)).read())["attempt"] == committed["attempt"] == other.attempt
    assert pq.read_table(layout.path(f"selected/part-{other.attempt}.parquet")).num_rows == 1
    stalled.close()
    other.close()


def test_the_manifest_lists_exactly_what_this_attempt_wrote(tmp_path):
    cfg = RunConfig()
    layout = _layout(tmp_path, cfg)
    writer = RunWriter(layout, cfg)
    writer.begin()
    try:
        writer._write(writer._part("selected"), pa.table({"doc_id": ["a", "b"]}))
        storage.write_parquet(layout.fs, layout.path("selected/part-zombie.parquet"), pa.table({"doc_id": ["z"]}))
        committed = writer.commit(REPORT, {"selected": 2})
        listed = {e["path"]: e for e in committed["files"]}
        assert set(listed) == {f"selected/part-{writer.attempt}.parquet", "cost_report.json", "report.html"}
        assert listed[f"selected/part-{writer.attempt}.parquet"]["rows"] == 2
        assert not os.path.exists(layout.path("selected/part-zombie.parquet"))
    finally:
        writer.close()

    again = RunWriter(layout, cfg)
    again.begin()
    try:
        part = again._part("selected")
        again.clear_previous()
        again._write(part, pa.table({"doc_id": ["a"]}))
        os.unlink(part)  # lost after the write: the attempt must not commit a manifest naming it
        with pytest.raises(storage.StorageError, match="written by this attempt but missing"):
            again.commit(REPORT, {"selected": 1})
        assert not os.path.exists(layout.path(MANIFEST))
    finally:
        again.close()


# -- config: the claim timeout outlasts the longest S3 retry sequence ----------------------------------------
def test_the_claim_timeout_must_outlast_the_s3_retry_sequence():
    assert load_config("nightly").storage.lock_timeout_s > 0  # the packaged configs are consistent
    load_config("cluster-h100")
    with pytest.raises(ConfigError, match=r"storage\.lock_timeout_s=120 must exceed \d+s.*storage\.retries=10"):
        load_config("nightly", ["storage.lock_timeout_s=120"])
    load_config("nightly", ["storage.lock_timeout_s=120", "storage.retries=2"])


# -- end to end: attempt A stalls, B takes over and commits, A resumes ------------------------------------------
@pytest.mark.slow
def test_a_stalled_attempt_resumes_after_a_takeover_and_fails_leaving_the_new_run_intact(tmp_path):
    import psutil

    from labelnext.pipelines.sample_corpus import write_sample_corpus

    corpus = write_sample_corpus(tmp_path / "corpus.parquet", n_docs=100, seed=4)
    out = tmp_path / "out"
    timeout_s = 20
    args = ("run", "--corpus", str(corpus), "--output", str(out), "--budget", "4", "--run-id", "r",
            "--run-date", "2026-11-25", *QUICK, "--set", f"storage.lock_timeout_s={timeout_s}",
            "--set", "storage.retries=0")
    a = subprocess.Popen(cli_args(*args), cwd=REPO, env=cli_env({"LABELNEXT_STALL": "before_clear"}),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        while psutil.Process(a.pid).status() != psutil.STATUS_STOPPED:
            assert a.poll() is None and time.monotonic() < deadline, (
                f"attempt A never reached its stall point:\n{a.communicate()[1][-3000:] if a.poll() is not None else ''}")
            time.sleep(0.5)
        claim = str(out / "_locks" / "run_date=2026-11-25" / "run_id=r.json")
        while LocalObjects().get(claim).age_s <= timeout_s:  # A is frozen: its claim stops being renewed
            time.sleep(1)
        b = subprocess.run(cli_args(*args), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
        assert b.returncode == 0, b.stderr[-3000:]
        assert "took over the abandoned claim" in b.stderr
    except BaseException:
        a.kill()
        raise
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
    _, a_err = a.communicate(timeout=300)
    assert a.returncode == 1, a_err[-3000:]
    line = error_line(subprocess.CompletedProcess(a.args, a.returncode, "", a_err))
    assert line.startswith("error:") and "another attempt took over the claim" in line, line
    assert "Traceback" not in a_err

    run = run_dir(out, "r")
    committed = manifest(run)
    listed = {e["path"]: e for e in committed["files"]}
    present = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()} - {MANIFEST}
    assert present == set(listed)
    for rel, entry in listed.items():
        assert (run / rel).stat().st_size == entry["bytes"], rel
    assert pq.read_table(run / "selected").num_rows == committed["counts"]["selected"] == 4
    ledger_dir = out / "ledger" / "run_date=2026-11-25" / "run_id=r"
    assert [p.name for p in ledger_dir.iterdir()] == [f"part-{committed['attempt']}.parquet"]
