"""The audited, adaptive loop of the quality bench (bench/adaptive.py) on a small synthetic pool: the rounds' label
counts, the audit as a uniform draw from the unlabelled pool, the bandit's split, and the coverage bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from bench import adaptive, loop
from bench.result_cache import ResultCache
from labelnext.ops.select.audit import audit_keys, audit_salt, audit_size
from tests.test_bench_loop import _loop as pool_loop

PER_ROUND = 40  # audit_size(40, 0.05) = 2: round 2's audit is labelled evidence in round 3


def _loop(n: int = 150) -> adaptive.AuditedLoop:
    return pool_loop(PER_ROUND, n, adaptive.AuditedLoop)[0]


def test_adaptive_rounds_audit_the_unlabelled_pool_uniformly_and_split_the_rest_by_the_bandit(monkeypatch):
    lp = _loop()
    seen = []
    real = adaptive.AuditedLoop.audited_round

    def audited_round(self, strategy, rest, budget, labelled, *args):
        out = real(self, strategy, rest, budget, labelled, *args)
        seen.append((rest.copy(), labelled.copy(), out[0].copy()))
        return out

    monkeypatch.setattr(adaptive.AuditedLoop, "audited_round", audited_round)
    curve = lp.run("adaptive", 3, seed=4)
    assert [labels for labels, _, _ in curve] == [40, 80, 120]
    assert curve[0][2] is None and len(seen) == 2  # round 1 is the cold start: no task model, no audit
    ids = lp.pool.ids.astype(str)
    n_audit = audit_size(PER_ROUND, 0.05)
    for r, (rest, labelled, picked) in enumerate(seen, start=1):
        record = curve[r][2]
        assert len(labelled) == 40 * r and np.array_equal(rest, np.setdiff1d(np.arange(len(ids)), labelled))
        keys = audit_keys(ids[rest].tolist(), audit_salt(4, f"bench-round-{r}"))
        expected = ids[rest][np.lexsort((ids[rest], keys))[:n_audit]].tolist()  # smallest keys of the unlabelled
        assert record["audit_docs"] == expected and not set(expected) & set(ids[labelled])
        assert ids[picked[:n_audit]].tolist() == expected and len(set(picked.tolist())) == PER_ROUND
        assert not set(picked.tolist()) & set(labelled.tolist())
        assert record["picked"]["audit"] == n_audit and sum(record["picked"].values()) == PER_ROUND
        assert set(record["shares"]) == set(adaptive.ADAPTIVE_RULES)
        assert sum(record["shares"].values()) == pytest.approx(1.0)
        assert record["true_f1"] == curve[r - 1][1]  # the model the audit scored: trained before its labels
        assert record["f1_low"] <= record["f1_est"] <= record["f1_high"]
    assert set(seen[1][1]) == set(seen[0][1]) | set(seen[0][2])  # round 2's picks are labelled before round 3
    # round 2 has no labelled audit yet (the incumbent's head start alone); round 3 scores the rules on round 2's audit
    assert curve[1][2]["z"] == {r: 0.0 for r in adaptive.ADAPTIVE_RULES}
    assert curve[1][2]["gain"] == {r: None for r in adaptive.ADAPTIVE_RULES}
    from labelnext.ops.select.bandit import split_shares
    from labelnext.ops.select.selector import SelectConfig

    defaults = SelectConfig()  # no evidence: the incumbent's head start and the even exploration share alone
    assert curve[1][2]["shares"] == pytest.approx(split_shares(adaptive.ADAPTIVE_RULES, {}, defaults.rules_explore,
                                                               defaults.rules_lead))
    assert curve[1][2]["shares"]["cluster_margin"] > 0.8
    assert all(g is not None and np.isfinite(g) for g in curve[2][2]["gain"].values())


def test_audit_draw_is_uniform_over_the_pool_it_is_given():
    ids = np.array([f"doc-{i}" for i in range(20)], dtype=object)
    counts = np.zeros(20)
    for rnd in range(2000):
        counts[adaptive.audit_draw(ids, 2, seed=1, rnd=rnd)] += 1
    assert counts.sum() == 4000 and abs(counts - 200).max() < 60  # binomial sd 13: 4.5 sd


def test_audited_strategies_cost_only_the_audit_and_keep_their_records_through_the_cache(tmp_path):
    lp = _loop()
    cache = ResultCache(tmp_path / "loop.jsonl")
    keys = {(st, s): f"{st}-{s}" for st in ("labelnext", *loop.AUDITED) for s in range(2)}
    results = loop.bench_loop("synthetic", lp, ["labelnext", *loop.AUDITED], 3, 2, cache, keys)
    again = loop.bench_loop("synthetic", lp, ["labelnext", *loop.AUDITED],
                            3, 2, ResultCache(tmp_path / "loop.jsonl"), keys)  # read back from disk
    assert [(r.strategy, r.round, r.labels, r.f1, r.audit) for r in again] == \
        [(r.strategy, r.round, r.labels, r.f1, r.audit) for r in results]
    first = {(r.strategy, r.seed): r.f1 for r in results if r.round == 1}
    assert first[("labelnext+audit", 0)] == first[("labelnext", 0)] == first[("adaptive", 0)]  # the same cold start
    records = adaptive.audit_records(results)
    assert len(records) == len(loop.AUDITED) * 2 * 2  # every audited strategy x 2 seeds x rounds 2-3
    audit_cm = [r.audit for r in records if r.strategy == "labelnext+audit"]
    assert all(a["picked"] == {"audit": 2, "cluster_margin": PER_ROUND - 2} for a in audit_cm)
    even = [r.audit["shares"] for r in records if r.strategy == "adaptive+even"]  # explore 1: evidence ignored
    assert even and all(sh == pytest.approx(dict.fromkeys(adaptive.ADAPTIVE_RULES, 1 / 3)) for sh in even)
    text = adaptive.render(results, ["synthetic"], ["labelnext", *loop.AUDITED], 3, PER_ROUND)
    assert f"| synthetic | {len(records)} | 2.0 |" in text and "| labelnext+audit - labelnext | mean |" in text
    with pytest.raises(ValueError, match="AuditedLoop"):
        loop.Loop.run(lp, "adaptive", 2, 0)


def test_coverage_counts_the_rounds_whose_interval_holds_the_true_value():
    def rec(low: float, high: float, true: float) -> loop.LoopResult:
        audit = {"audit_n": 10, "f1_est": (low + high) / 2, "f1_low": low, "f1_high": high, "true_f1": true,
                 "acc_low": 0.5, "acc_high": 0.9, "true_acc": 0.95, "pool_f1": true}
        return loop.LoopResult("ds", "adaptive", 0, 2, 400, true, audit)

    got = adaptive.coverage([rec(0.7, 0.9, 0.8), rec(0.7, 0.9, 0.91), rec(1.0, 1.0, 0.996), rec(0.6, 1.0, 1.0)])
    assert got["n"] == 4 and got["f1"] == got["pool"] == 0.5 and got["acc"] == 0.0
    assert got["f1_width"] == pytest.approx((0.2 + 0.2 + 0.0 + 0.4) / 4)
    table = adaptive.coverage_table([rec(0.7, 0.9, 0.8), rec(1.0, 1.0, 0.996)], ["ds"])
    assert "| ds | 2 | 10.0 | 50.0% |" in table and "| all datasets | 2 |" in table
