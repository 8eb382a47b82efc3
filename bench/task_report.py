"""The tables of ``bench.quality --task``: the scoring LLM's accuracy per dataset, every rule against TypiClust
(mean over datasets and the worst dataset), and the issue's goal checked on the rule picked out of sample.

Goal: a cold start at least 2 macro-F1 points above TypiClust and never below random, on every dataset at
B >= 50, out of sample (for each held-out dataset the rule picked on the others, ``bench/lodo.py``).
"""

from __future__ import annotations

import numpy as np

from bench import lodo
from bench.common import markdown_table

GOAL_OVER_TYPICLUST = 0.02
GOAL_MIN_BUDGET = 50


def accuracy_table(rows: list[tuple[str, int, int, float, float, float]]) -> str:
    """Rows: (dataset, classes, pool documents, zero-shot accuracy, calibrated accuracy, majority class share)."""
    return markdown_table(
        ["dataset", "classes", "pool docs scored", "zero-shot accuracy (raw argmax)", "calibrated accuracy",
         "majority class share"],
        [[d, c, n, f"{raw:.3f}", f"{cal:.3f}", f"{maj:.3f}"] for d, c, n, raw, cal, maj in rows])


def versus_table(f1: lodo.F1, names: list[str], budgets: list[int], order: list[str], reference: str) -> str:
    """Per strategy and budget: the gain over ``reference`` averaged over datasets (± SE over seeds, paired) and
    the worst dataset's gain."""
    rows = []
    for st in order:
        if st == reference:
            continue
        cells = []
        for b in budgets:
            mean, se = lodo.paired_over_datasets(f1, names, b, st, reference)
            worst = min(names, key=lambda d: lodo.paired(f1, d, b, st, reference)[0])
            cells.append(f"{mean:+.3f} ± {se:.3f} (worst {lodo.paired(f1, worst, b, st, reference)[0]:+.3f} "
                         f"{worst})")
        rows.append([st, *cells])
    return markdown_table(["strategy", *[f"B={b}" for b in budgets]], rows)


def goal(f1: lodo.F1, family: list[str], names: list[str], budgets: list[int]) -> str:
    """The goal per held-out dataset and budget >= 50, for the rule picked on the other datasets (``robust``),
    and how far every family member gets on its own (its worst dataset)."""
    judged = [b for b in budgets if b >= GOAL_MIN_BUDGET]
    if not judged or not family or len(names) < 2:
        return "(goal not judged: needs two datasets, a task-aware family and a budget >= 50)"
    picks = lodo.lodo(f1, family, names, budgets)
    lines, passed = [], True
    for b in judged:
        cells = []
        for d, st in picks.items():
            t = lodo.paired(f1, d, b, st, "typiclust")[0]
            r, r_se = lodo.paired(f1, d, b, st, "random")
            ok = t >= GOAL_OVER_TYPICLUST and r + r_se >= 0
            passed &= ok
            cells.append(f"{d} `{st}` {t:+.3f} vs TypiClust, {r:+.3f} ± {r_se:.3f} vs random "
                         f"({'PASS' if ok else 'FAIL'})")
        lines.append(f"- B={b}: " + "; ".join(cells))
    head = (f"Goal (>= +{GOAL_OVER_TYPICLUST:.2f} over TypiClust and not significantly below random on every "
            f"dataset at B >= {GOAL_MIN_BUDGET}, the rule picked leave one dataset out): "
            f"{'REACHED' if passed else 'NOT reached'}.")
    reach = []
    for st in family:
        worst = min((lodo.paired(f1, d, b, st, "typiclust")[0], d, b) for d in names for b in judged)
        mean = float(np.mean([lodo.paired(f1, d, b, st, "typiclust")[0] for d in names for b in judged]))
        reach.append(f"- `{st}`: vs TypiClust {mean:+.3f} on average over datasets and budgets >= "
                     f"{GOAL_MIN_BUDGET}, worst {worst[0]:+.3f} ({worst[1]}, B={worst[2]})")
    return "\n".join([head, "", *lines, "", "How far each task-aware rule gets on its own (in sample):", "", *reach])
