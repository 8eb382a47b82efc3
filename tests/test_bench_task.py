"""``bench.quality --task``: the datasets' task prompts validate as the product's settings, label names map back
to the gold labels, and the goal line judges the rule picked out of sample (synthetic F1 tables)."""

from __future__ import annotations

import numpy as np

from bench import task_report
from bench.strategies import task_strategies
from bench.task_prompts import TASKS, gold_label, readable, task_config
from labelnext.pipelines.config import load_config


def test_every_dataset_prompt_is_a_valid_score_task_with_readable_label_names():
    labels = np.array(["book_flight", "are_you_a_bot", "book_flight"], dtype=object)
    for name, task in TASKS.items():
        cfg = task_config(load_config(), name, labels)
        assert cfg.score.task.prompted and "{text}" in cfg.score.task.template
        assert len(cfg.score.task.choices) >= 2
    clinc = task_config(load_config(), "clinc150_test", labels).score.task.choices
    assert clinc == ["are you a bot", "book flight"]
    assert [gold_label(c, labels) for c in clinc] == ["are_you_a_bot", "book_flight"]
    assert readable("Sci/Tech") == "Sci/Tech" and gold_label("Sci/Tech", np.array(["Sci/Tech"])) == "Sci/Tech"


def test_task_strategies_compare_the_task_family_with_random_typiclust_and_the_default():
    out = {s.name: s for s in task_strategies("cluster_only")}
    assert {"random", "typiclust", "labelnext"} <= set(out)
    family = [s for s in out.values() if s.family]
    assert family and all(s.task for s in family) and not out["labelnext"].task
    assert any("select.llm_label_quota=true" in s.overrides for s in family)


def _f1(gains: dict[str, dict[str, float]], seeds: int = 4) -> dict:
    """(dataset, budget, strategy, seed) -> F1: random 0.70, TypiClust 0.72, each rule TypiClust + its gain."""
    f1 = {}
    for d, per_rule in gains.items():
        for b in (20, 50):
            for s in range(seeds):
                noise = 0.001 * s
                f1[(d, b, "random", s)] = 0.70 + noise
                f1[(d, b, "typiclust", s)] = 0.72 + noise
                for rule, gain in per_rule.items():
                    f1[(d, b, rule, s)] = 0.72 + gain + noise
    return f1


def test_goal_is_reached_only_when_the_out_of_sample_pick_clears_typiclust_on_every_dataset():
    good = _f1({d: {"a": 0.03, "b": 0.01} for d in ("x", "y", "z")})
    text = task_report.goal(good, ["a", "b"], ["x", "y", "z"], [20, 50])
    assert "REACHED" in text and "NOT" not in text and "B=20" not in text.split("How far")[0]
    bad = _f1({"x": {"a": 0.03, "b": 0.01}, "y": {"a": 0.03, "b": 0.01}, "z": {"a": 0.01, "b": 0.01}})
    text = task_report.goal(bad, ["a", "b"], ["x", "y", "z"], [20, 50])
    assert "NOT reached" in text and "z `a` +0.010 vs TypiClust" in text and "(FAIL)" in text
    assert "`b`: vs TypiClust +0.010" in text
    table = task_report.versus_table(bad, ["x", "y", "z"], [50], ["typiclust", "a"], "typiclust")
    assert "+0.023 ± 0.000 (worst +0.010 z)" in table
