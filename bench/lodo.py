"""Out-of-sample choice of the cold-start rule: leave one dataset out.

For each held-out dataset, the rule is picked on the *other* datasets only and reported on the held-out one.
Two pick criteria, both over every (dataset, budget) cell of the other datasets, gains over random paired by
seed:

- ``worst``: the largest worst-cell mean gain. The goal is a default never worse than random, but on a
  saturated dataset (every rule within 0.001 of the ceiling) the worst cell is decided by seed noise.
- ``robust``: the fewest cells *significantly* below random (mean + SE < 0), then the largest mean gain. It
  asks "never worse than random" only where the data can tell, and otherwise rewards the typical gain.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from bench.common import markdown_table

F1 = dict[tuple[str, int, str, int], float]  # (dataset, budget, strategy, seed) -> macro-F1


def paired(f1: F1, dataset: str, budget: int, strategy: str, reference: str) -> tuple[float, float]:
    """Mean over seeds of (strategy - reference) on one dataset and budget, with its standard error."""
    seeds = sorted(s for (d, b, st, s) in f1 if (d, b, st) == (dataset, budget, strategy)
                   and (dataset, budget, reference, s) in f1)
    diffs = np.array([f1[(dataset, budget, strategy, s)] - f1[(dataset, budget, reference, s)] for s in seeds])
    se = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
    return float(diffs.mean()), se


def paired_over_datasets(f1: F1, datasets: list[str], budget: int, strategy: str,
                         reference: str) -> tuple[float, float]:
    """Over the seeds every dataset ran: the mean of the per-seed difference averaged over datasets, and its
    standard error."""
    seeds = [s for s in sorted({k[3] for k in f1})
             if all((d, budget, strategy, s) in f1 and (d, budget, reference, s) in f1 for d in datasets)]
    per_seed = np.array([np.mean([f1[(d, budget, strategy, s)] - f1[(d, budget, reference, s)] for d in datasets])
                         for s in seeds])
    se = float(per_seed.std(ddof=1) / np.sqrt(len(per_seed))) if len(per_seed) > 1 else float("nan")
    return float(per_seed.mean()), se


CRITERIA = ("robust", "worst")


def choose(f1: F1, candidates: Iterable[str], datasets: list[str], budgets: Iterable[int],
           criterion: str = "robust") -> str:
    """The candidate that is best by ``criterion`` (see the module docstring); ties keep list order."""
    budgets = list(budgets)

    def key(st: str) -> tuple[float, ...]:
        cells = [paired(f1, d, b, st, "random") for d in datasets for b in budgets]
        if criterion == "worst":
            return (min(m for m, _ in cells),)
        losses = sum(1 for m, se in cells if m + (0.0 if np.isnan(se) else se) < 0)
        return (-losses, float(np.mean([m for m, _ in cells])))

    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}: one of {', '.join(CRITERIA)}")
    return max(candidates, key=key)


def lodo(f1: F1, candidates: list[str], datasets: list[str], budgets: list[int],
         criterion: str = "robust") -> dict[str, str]:
    """Held-out dataset -> the rule chosen on the others (every dataset's pick when there is only one)."""
    if len(datasets) == 1:
        return {datasets[0]: choose(f1, candidates, datasets, budgets, criterion)}
    return {d: choose(f1, candidates, [o for o in datasets if o != d], budgets, criterion) for d in datasets}


def _cell(mean: float, se: float) -> str:
    return f"{mean:+.3f} ± {se:.3f}"


def lodo_table(f1: F1, picks: dict[str, str], budgets: list[int]) -> str:
    """Per held-out dataset: the rule picked on the others, its gain over random and over TypiClust there;
    then the mean and the worst held-out dataset per budget."""
    rows, vs_random, vs_typiclust = [], {b: [] for b in budgets}, {b: [] for b in budgets}
    has_typiclust = any(k[2] == "typiclust" for k in f1)
    for d, st in picks.items():
        cells = []
        for b in budgets:
            r = paired(f1, d, b, st, "random")
            t = paired(f1, d, b, st, "typiclust") if has_typiclust else (float("nan"), float("nan"))
            vs_random[b].append((r[0], d))
            vs_typiclust[b].append(t[0])
            cells.append(f"{_cell(*r)} / {t[0]:+.3f}")
        rows.append([d, f"`{st}`", *cells])
    rows.append(["**mean**", "", *[f"{np.mean([v for v, _ in vs_random[b]]):+.3f} / {np.mean(vs_typiclust[b]):+.3f}"
                                   for b in budgets]])
    rows.append(["**worst dataset**", "", *[f"{min(vs_random[b])[0]:+.3f} ({min(vs_random[b])[1]})"
                                            for b in budgets]])
    head = ["held-out dataset", "rule picked on the other datasets",
            *[f"B={b}: vs random ± SE / vs TypiClust" for b in budgets]]
    return markdown_table(head, rows)


def acceptance(f1: F1, strategy: str, datasets: list[str], budgets: list[int]) -> tuple[bool, str]:
    """``strategy`` level with random on every dataset and budget (mean - SE >= 0, paired by seed) and level
    with TypiClust on the mean over datasets at every budget."""
    lines, ok_all = [], True
    for b in budgets:
        per = {d: paired(f1, d, b, strategy, "random") for d in datasets}
        worst = min(per, key=lambda d: per[d][0] - per[d][1])
        vs_typi, typi_se = paired_over_datasets(f1, datasets, b, strategy, "typiclust")
        ok = all(m - se >= 0 for m, se in per.values()) and vs_typi >= 0
        ok_all &= ok
        lines.append(f"- B={b}: vs random, worst dataset {worst} {_cell(*per[worst])} (mean - SE "
                     f"{per[worst][0] - per[worst][1]:+.3f}); vs TypiClust, mean over datasets {vs_typi:+.4f} ± "
                     f"{typi_se:.4f}: {'PASS' if ok else 'FAIL'}")
    return ok_all, "\n".join(lines)
