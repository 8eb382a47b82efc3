"""Shared fixtures: small real corpora written as Parquet, and a local Ray for end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def write_corpus(path: Path, ids, texts, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}
    cols.update({k: pa.array(v) for k, v in extra.items()})
    pq.write_table(pa.table(cols), path)
    return path


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory) -> Path:
    from labelnext.pipelines.sample_corpus import write_sample_corpus

    return write_sample_corpus(tmp_path_factory.mktemp("corpus") / "sample.parquet", n_docs=300, seed=3)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, quiet)."""
    import ray

    from labelnext.pipelines.config import RunConfig
    from labelnext.pipelines.selection import init_ray

    if "RAY_ADDRESS" in os.environ:
        del os.environ["RAY_ADDRESS"]
    init_ray(RunConfig.model_validate({"ray": {"num_cpus": 2}}))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def committed_run(sample_corpus, tmp_path_factory):
    """One real run with an LLM-ranked rule (every stage, the score stage included): (run folder, process)."""
    from tests.cli_run import LLM_RULE, labelnext, run_dir

    out = tmp_path_factory.mktemp("out")
    proc = labelnext("run", "--corpus", str(sample_corpus), "--output", str(out), "--budget", "12",
                     "--run-id", "e2e", "--run-date", "2026-11-25", "--set", "ray.num_cpus=2", *LLM_RULE, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir(out, "e2e"), proc


@pytest.fixture(scope="session")
def default_run_proc(sample_corpus, tmp_path_factory):
    """One real run with the packaged default config (a cold start: no LLM): (run folder, process)."""
    from tests.cli_run import labelnext, run_dir

    out = tmp_path_factory.mktemp("out-default")
    proc = labelnext("run", "--corpus", str(sample_corpus), "--output", str(out), "--budget", "12",
                     "--run-id", "e2e", "--run-date", "2026-11-25", "--set", "ray.num_cpus=2", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir(out, "e2e"), proc


@pytest.fixture(scope="session")
def default_run(default_run_proc):
    """The packaged default's run folder (see default_run_proc)."""
    return default_run_proc[0]
