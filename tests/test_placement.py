"""Placement decisions from fake resource maps (no Ray needed)."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from labelnext.pipelines.placement import PlacementError, faiss_use_gpu, plan_placement
from labelnext.pipelines.config import ClusterResources, EmbedResources, ResourcesConfig, ScoreResources


def node(cpus: float, gpus: float = 0.0, alive: bool = True, node_id: str = "n") -> dict:
    res = {"CPU": cpus, "memory": 1e10, f"node:{node_id}": 1.0}
    if gpus:
        res["GPU"] = gpus
    return {"NodeID": node_id, "Alive": alive, "Resources": res}


def totals(*nodes: dict) -> dict:
    out: dict[str, float] = {}
    for n in nodes:
        if n["Alive"]:
            for k, v in n["Resources"].items():
                out[k] = out.get(k, 0.0) + v
    return out


def plan(nodes: list[dict], embed: EmbedResources | None = None, score: ScoreResources | None = None, **kw):
    cfg = ResourcesConfig(embed=embed or EmbedResources(), score=score or ScoreResources())
    return plan_placement(totals(*nodes), cfg, nodes=nodes, **kw)


P5 = [node(16, node_id="head"), node(192, 8, node_id="w1"), node(192, 8, node_id="w2")]


def test_gpu_cluster_fractional_encoder_and_whole_gpu_scorer():
    p = plan(P5, EmbedResources(num_gpus=0.25, num_cpus=4), ScoreResources(num_gpus=1, num_cpus=8))
    assert p.embed.use_gpu and p.embed.num_gpus == 0.25 and p.embed.num_cpus == 4
    assert p.embed.concurrency == 64  # 16 GPUs x 4 actors per GPU; 32 x 4 CPUs fits beside each node's 192
    assert p.score.use_gpu and p.score.num_gpus == 1 and p.score.concurrency == 16
    assert not p.warnings
    assert any("embed: GPU, 64 actors" in n for n in p.notes)


def test_fractional_gpus_pack_per_physical_gpu():
    # 0.3 GPU per actor: 3 fit on each GPU (not floor(8 / 0.3) = 26 per node).
    p = plan([node(192, 8)], EmbedResources(num_gpus=0.3, num_cpus=1))
    assert p.embed.concurrency == 24
    p = plan([node(192, 8)], EmbedResources(num_gpus=0.1, num_cpus=1))
    assert p.embed.concurrency == 80  # 1/0.1 must not floor to 9


def test_gpu_actors_limited_by_node_cpus():
    p = plan([node(8, 8)], EmbedResources(num_gpus=0.25, num_cpus=2))
    assert p.embed.concurrency == 3  # 32 by GPU, 4 by CPU, minus one so a CPU stays free for the feeders


def test_tensor_parallel_scorer():
    p = plan(P5, score=ScoreResources(num_gpus=1, tensor_parallel_size=4))
    assert p.score.num_gpus == 4 and p.score.tensor_parallel_size == 4
    assert p.score.concurrency == 4  # floor(16 / (1 x 4))


def test_tensor_parallel_larger_than_a_node_is_an_error():
    with pytest.raises(PlacementError, match="largest node has 8"):
        plan(P5, score=ScoreResources(num_gpus=1, tensor_parallel_size=16))


def test_non_integer_gpus_above_one_round_up():
    p = plan([node(64, 8)], score=ScoreResources(num_gpus=1.5))
    assert p.score.num_gpus == 2 and p.score.concurrency == 4
    assert any("not a whole number" in n for n in p.notes)


def test_no_gpu_auto_falls_back_to_cpu_with_one_warning(caplog):
    nodes = [node(8, node_id="a"), node(8, node_id="b")]
    with caplog.at_level(logging.WARNING, logger="labelnext.pipelines.placement"):
        p = plan(nodes, EmbedResources(num_gpus=0.25, num_cpus=2), ScoreResources(num_gpus=1, num_cpus=4))
    assert not p.embed.use_gpu and p.embed.num_gpus == 0
    assert not p.score.use_gpu and p.score.num_gpus == 0
    assert p.embed.concurrency == 7  # 8 fit on 16 CPUs, one held back for the read tasks
    assert p.score.concurrency == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "embed" in warnings[0].getMessage() and "score" in warnings[0].getMessage()
    assert p.warnings == [warnings[0].getMessage()]


def test_default_config_on_a_cluster_without_gpus_runs_on_cpu_quietly(caplog):
    """The embedded default's num_gpus sizes GPU actors when there are GPUs; it is no ask on a CPU cluster."""
    from labelnext.pipelines.config import load_config

    with caplog.at_level(logging.WARNING, logger="labelnext.pipelines.placement"):
        p = plan_placement(totals(node(2)), load_config().resources, nodes=[node(2)])
        q = plan([node(2)])
    assert not p.embed.use_gpu and not p.score.use_gpu and not q.embed.use_gpu
    assert not p.warnings and not q.warnings and not caplog.records
    gpu = plan_placement(totals(node(8, 1)), load_config().resources, nodes=[node(8, 1)])
    assert gpu.embed.use_gpu and gpu.embed.num_gpus == 0.25 and gpu.score.use_gpu and gpu.score.num_gpus == 1


def test_explicit_gpu_ask_from_overrides_still_warns_without_gpus(caplog):
    from labelnext.pipelines.config import load_config

    cfg = load_config(overrides=["resources.score.num_gpus=0.5"])
    with caplog.at_level(logging.WARNING, logger="labelnext.pipelines.placement"):
        p = plan_placement(totals(node(2)), cfg.resources, nodes=[node(2)])
    assert len(p.warnings) == 1 and "resources.score (num_gpus=0.5)" in p.warnings[0]
    assert "resources.embed" not in p.warnings[0]


def test_no_gpu_explicit_cuda_is_a_clear_error():
    with pytest.raises(PlacementError, match=r"resources\.score\.device is 'cuda'.*--set resources\.score\.device=auto"):
        plan([node(8)], score=ScoreResources(device="cuda"))


def test_device_cpu_never_requests_gpus_and_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="labelnext.pipelines.placement"):
        p = plan(P5, EmbedResources(device="cpu", num_cpus=4), ScoreResources(device="cpu"))
    assert not p.embed.use_gpu and p.embed.num_gpus == 0
    assert p.embed.concurrency == 99  # (16 + 192 + 192) / 4 - 1 reserve
    assert not caplog.records


def test_auto_with_zero_gpus_requested_stays_on_cpu_quietly(caplog):
    with caplog.at_level(logging.WARNING, logger="labelnext.pipelines.placement"):
        p = plan([node(4)], EmbedResources(num_gpus=0), ScoreResources(num_gpus=0))
    assert not p.embed.use_gpu and not p.score.use_gpu
    assert not caplog.records


def test_cuda_with_zero_gpus_means_one_gpu():
    p = plan([node(32, 2)], score=ScoreResources(device="cuda", num_gpus=0))
    assert p.score.use_gpu and p.score.num_gpus == 1 and p.score.concurrency == 2


def test_pinned_concurrency_wins_and_is_noted():
    p = plan([node(32, 1)], EmbedResources(num_gpus=0.25, concurrency=16), ScoreResources(concurrency=3))
    assert p.embed.concurrency == 16 and p.score.concurrency == 3
    assert any("embed: concurrency=16 pinned above the 4" in n for n in p.notes)


def test_pinned_cpu_pool_that_starves_its_feeders_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="labelnext.pipelines.placement"):
        p = plan([node(1), node(1)], EmbedResources(device="cpu", concurrency=2), ScoreResources(device="cpu"))
    assert p.embed.concurrency == 2
    assert len(caplog.records) == 1 and "embed.concurrency=2" in caplog.records[0].getMessage()
    assert "leave it unset to derive 1" in p.warnings[0]


def test_tiny_nodes_cap_cpus_per_actor():
    nodes = [node(2, node_id="a"), node(2, node_id="b")]
    p = plan(nodes, EmbedResources(device="cpu", num_cpus=8), ScoreResources(device="cpu", num_cpus=3))
    assert p.embed.num_cpus == 2 and p.score.num_cpus == 2
    assert p.embed.concurrency == 1  # 2 fit on 4 CPUs, one held back
    assert any("embed.num_cpus=8 is more than the largest node's 2 CPUs" in n for n in p.notes)


def test_cpu_reserve_counts_cpus_left_over_on_nodes():
    # Two 3-CPU nodes, 2-CPU actors: one per node, and 2 CPUs stay free, so nothing is held back.
    p = plan([node(3, node_id="a"), node(3, node_id="b")], EmbedResources(device="cpu", num_cpus=2),
             ScoreResources(device="cpu"))
    assert p.embed.concurrency == 2 and not p.warnings


def test_single_cpu_machine_still_gets_one_actor():
    p = plan([node(1)])
    assert p.embed.concurrency == 1 and p.score.concurrency == 1


def test_dead_nodes_are_ignored():
    nodes = [node(4, 0, node_id="h"), node(64, 8, alive=False, node_id="gone")]
    p = plan_placement({"CPU": 4.0}, ResourcesConfig(), nodes=nodes)
    assert not p.embed.use_gpu


def test_without_node_list_the_cluster_is_one_node():
    p = plan_placement({"CPU": 16.0, "GPU": 2.0}, ResourcesConfig(embed=EmbedResources(num_gpus=0.5, num_cpus=2)))
    assert p.embed.concurrency == 4 and p.score.concurrency == 2


def test_gpu_node_too_small_for_the_cpus_asked_is_an_error():
    # The big CPU-only head keeps num_cpus=4 legal, but the only GPU node has 2 CPUs.
    with pytest.raises(PlacementError, match=r"lower resources\.score\.num_cpus"):
        plan([node(64, node_id="head"), node(2, 1, node_id="g")], score=ScoreResources(num_gpus=1, num_cpus=4))


def _fake_faiss(monkeypatch, n: int | None) -> None:
    mod = types.ModuleType("faiss")
    if n is not None:
        mod.get_num_gpus = lambda: n  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "faiss", mod)


def test_faiss_use_gpu(monkeypatch):
    _fake_faiss(monkeypatch, 2)
    assert faiss_use_gpu(ClusterResources(use_gpu="auto"))
    assert not faiss_use_gpu(ClusterResources(use_gpu="never"))
    _fake_faiss(monkeypatch, 0)
    assert not faiss_use_gpu(ClusterResources(use_gpu="auto"))
    _fake_faiss(monkeypatch, None)  # a build without the GPU API
    assert not faiss_use_gpu(ClusterResources(use_gpu="auto"))
    monkeypatch.setitem(sys.modules, "faiss", None)  # not installed: import raises ImportError
    assert not faiss_use_gpu(ClusterResources(use_gpu="auto"))


def test_installed_faiss_on_this_machine_does_not_crash():
    assert faiss_use_gpu(ClusterResources()) in (True, False)
