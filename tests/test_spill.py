"""Object spilling: ray.spill_dir and ray.object_store_memory reach the local Ray, and a run whose vectors
cannot fit the object store plus the spill disk stops before any compute with one line naming the setting."""

from __future__ import annotations

import re
import shutil
from collections import namedtuple

import pytest

from labelnext.pipelines import spill
from labelnext.pipelines.config import ConfigError, RayConfig, load_config
from tests.cli_run import QUICK, error_line, labelnext

GiB = 2**30
Usage = namedtuple("Usage", "total used free")


def _plan(rows: int, store: float, free: float) -> spill.SpillPlan:
    return spill.SpillPlan(rows=rows, dim=384, headroom=2.0, store_bytes=int(store * GiB), spill_dir="/spill",
                           free_bytes=int(free * GiB))


def test_vectors_that_fit_the_store_or_spill_to_the_disk_pass():
    assert _plan(1_000_000, store=8, free=0).problem() is None  # 2.9 GiB with headroom: in the store
    assert _plan(10_000_000, store=8, free=40).problem() is None  # 28.6 GiB: 8 in the store, the rest spilled


def test_vectors_beyond_store_and_disk_name_the_setting_and_the_numbers():
    problem = _plan(10_000_000, store=8, free=10).problem()
    assert problem.startswith("ray.spill_dir: /spill has 10.00 GiB free")
    assert "8.00 GiB" in problem and "28.61 GiB" in problem and "10,000,000 rows x 384 dims" in problem
    assert "\n" not in problem


def test_preflight_measures_the_spill_directory_and_the_running_object_store(ray_local, tmp_path, monkeypatch):
    cfg = RayConfig(spill_dir=str(tmp_path))
    seen = []

    def tiny_disk(path):
        seen.append(path)
        return Usage(GiB, GiB - 1024, 1024)

    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    store = ray_local.cluster_resources()["object_store_memory"]
    rows = int(store / (384 * 4 * 2)) + 10_000  # just past what the store holds: the rest must spill
    with pytest.raises(spill.SpillError, match=r"^ray\.spill_dir: .* has 0\.00 GiB free"):
        spill.preflight(cfg, rows, 384)
    assert seen == [str(tmp_path)]
    assert spill.preflight(cfg, 1000, 384).store_bytes == int(store)  # a small corpus passes


def test_a_joined_cluster_is_not_checked(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert spill.preflight(RayConfig(), 10**12, 384) is None


def test_the_settings_reach_ray_init_and_are_validated(tmp_path):
    cfg = RayConfig(spill_dir=str(tmp_path / "spill"), object_store_memory=100_000_000)
    assert spill.init_kwargs(cfg) == {"object_spilling_directory": str(tmp_path / "spill"),
                                      "object_store_memory": 100_000_000}
    assert (tmp_path / "spill").is_dir()
    assert spill.init_kwargs(RayConfig()) == {}
    with pytest.raises(ConfigError, match="ray.object_store_memory"):
        load_config(None, ["ray.object_store_memory=1000"])


def test_a_run_too_big_for_its_spill_disk_stops_before_compute(sample_corpus, tmp_path):
    spill_dir = tmp_path / "spill"
    proc = labelnext("run", "--corpus", str(sample_corpus), "--output", str(tmp_path / "out"), "--budget", "5",
                     *QUICK, "--set", f"ray.spill_dir={spill_dir}", "--set", "ray.object_store_memory=100000000",
                     "--set", "ray.spill_headroom=1e9")  # 300 docs held a billion times: more than any disk
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = error_line(proc)
    assert f"ray.spill_dir: {spill_dir} has" in line, proc.stderr[-2000:]
    assert "object store (ray.object_store_memory) 0.09 GiB" in line  # the local Ray got the configured store
    assert re.search(r"\d[\d,]* rows x 384 dims x 4 bytes", line)
    assert not re.search(r"labelnext: (read: \d|embed: )", proc.stderr)  # no stage got to work
    assert not list((tmp_path / "out").glob("run_date=*/run_id=*/manifest.json"))
