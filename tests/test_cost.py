"""The cost report: per-stage reserved view, the held view the cluster bills, and the counterfactuals' inputs."""

from __future__ import annotations

import json
import math

import pytest

from labelnext.pipelines.config import CostConfig
from labelnext.pipelines.cost import (
    CostLedger, StageCost, build_report, reference_model_usd, sample_texts, scoring_throughput,
)

PRICES = CostConfig(gpu_hour_usd=3.0, cpu_hour_usd=0.05)


def test_scoring_throughput_comes_from_the_actors_busy_time():
    # 2 actors, 1000 tokens, 4 busy seconds summed over both: 250 tokens/s each, 500/s for the pool; the
    # other 8 s of the 10 s stage were start-up.
    score = StageCost(wall_s=10.0, tokens=1000, cpus=2.0, extra={"busy_s": 4.0, "actors": 2})
    assert scoring_throughput(score) == (500.0, 8.0)
    # Per actor when known: one actor did 900 tokens in 3 s, the other 100 in 1 s -> 300 + 100 tokens/s.
    score.extra["busy_by_actor"] = {"a": (900, 3.0), "b": (100, 1.0)}
    assert scoring_throughput(score) == (400.0, 7.0)


def test_the_reference_model_is_priced_from_flops_at_the_stated_mfu():
    # 1M tokens x 2 x 70e9 FLOPs at 40% of 989 TFLOP/s = 353.9 GPU-seconds at $3/GPU-hour.
    assert reference_model_usd(1e6, PRICES) == pytest.approx(1e6 * 2 * 70e9 / (989e12 * 0.4) / 3600 * 3.0)
    assert reference_model_usd(1e6, PRICES.model_copy(update={"reference_mfu": 0.2})) == pytest.approx(
        2 * reference_model_usd(1e6, PRICES))


def test_headline_and_savings_use_what_the_cluster_held():
    ledger = CostLedger(PRICES)
    ledger.held.see({"CPU": 8.0, "GPU": 1.0}, nodes=2)
    with ledger.stage("score", cpus=1.0, gpus=0.0) as st:
        st.tokens, st.extra = 100, {"busy_s": 0.5, "actors": 1}
    report = build_report(ledger, budget=5, accepted_docs=100, corpus_tokens_estimate=1e4, token_sample_docs=50,
                          scoring_model_params=1e8, hardware={})
    held = report["held"]
    assert (held["nodes"], held["cpus"], held["gpus"]) == (2, 8.0, 1.0)
    assert report["total_usd"] == held["usd"] > report["reserved_usd"]
    assert report["savings_ratio"] == pytest.approx(report["counterfactuals"]["full_pass_scoring_model_usd"]
                                                    / held["usd"])
    assumptions = report["counterfactuals"]["assumptions"]
    assert "40% MFU of 989 TFLOP/s" in assumptions["full_pass_70b"] and "50 documents drawn at random" in \
        assumptions["corpus_tokens"]


def test_the_token_sample_is_seeded_random_and_independent_of_block_order(ray_local):
    ray = ray_local
    rows = [{"doc_id": f"d{i:04d}", "text": f"text {i}"} for i in range(2000)]
    first = sample_texts(ray.data.from_items(rows, override_num_blocks=4), 2000, 100, seed=0)
    again = sample_texts(ray.data.from_items(rows[::-1], override_num_blocks=7), 2000, 100, seed=0)
    assert len(first) == 100 and first == again
    assert first != [r["text"] for r in rows[:100]]
    indices = sorted(int(t.split()[1]) for t in first)
    assert indices[-1] - indices[0] > 1000  # spread over the corpus, not a prefix
    assert sample_texts(ray.data.from_items(rows), 2000, 100, seed=1) != first


@pytest.mark.slow
def test_a_run_prices_each_stage_at_what_it_reserved_and_bills_what_it_held(committed_run):
    run, _ = committed_run  # a real run with an LLM-ranked rule (conftest.py)
    cost = json.loads((run / "cost_report.json").read_text())
    prices = cost["prices"]
    for name, st in cost["stages"].items():
        expected = st["wall_s"] * (st["cpus"] * prices["cpu_hour_usd"] + st["gpus"] * prices["gpu_hour_usd"]) / 3600
        assert st["usd"] == pytest.approx(expected, rel=1e-9), name
    assert cost["reserved_usd"] == pytest.approx(sum(st["usd"] for st in cost["stages"].values()))
    held = cost["held"]
    assert held["cpus"] == 2.0 and held["wall_s"] >= sum(st["wall_s"] for st in cost["stages"].values())
    assert cost["total_usd"] == held["usd"] >= cost["reserved_usd"]
    cf = cost["counterfactuals"]
    assert cost["savings_ratio"] == pytest.approx(cf["full_pass_scoring_model_usd"] / cost["total_usd"])
    assert cf["scoring_tokens_per_s"] > 0 and math.isfinite(cf["full_pass_70b_usd"])
    assert cost["corpus"]["token_sample_docs"] == min(256, cost["corpus"]["accepted_docs"])
    assert set(cf["assumptions"]) >= {"corpus_tokens", "full_pass_scoring_model", "full_pass_70b"}
    busy = cost["stages"]["score"]["busy_by_actor"]  # the throughput comes from each actor's own busy time
    assert busy and sum(t for t, _ in busy.values()) == cost["stages"]["score"]["tokens"]
