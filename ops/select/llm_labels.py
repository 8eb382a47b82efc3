"""Selection signals from the task-aware LLM's answer (``score.task`` with choices): its predicted label.

- Cold start (``select.llm_label_quota``): the cluster quotas are filled one document per cluster per pass, each
  cluster taking its best-ranked remaining candidate among those whose LLM label is least represented in the
  selection so far, so the budget spreads over the predicted labels as well as over the clusters (class coverage
  where clusters follow topic and the labels do not).
- With labels (``select.llm_disagreement``): a candidate whose LLM label differs from the task model's
  predicted label is one the two models disagree on, a further sign of uncertainty; its ranking margin is
  lowered by the weight.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable

import numpy as np
import pyarrow as pa

from labelnext.ops.core.columns import LLM_LABEL, PREDICTED_LABEL


def label_names(table: pa.Table) -> np.ndarray:
    """The LLM label of every row as a comparable name ("" where there is none)."""
    if LLM_LABEL not in table.column_names:
        raise ValueError("select.llm_label_quota and select.llm_disagreement need the LLM's label per candidate: "
                         "set score.task.template and score.task.choices")
    return np.array([_normalised(v) for v in table.column(LLM_LABEL).to_pylist()], dtype=object)


def _normalised(label) -> str:
    """Label names compared loosely: case, and ``_``/``-``/spaces, so "book_flight" and "Book flight" agree."""
    return "" if label is None else re.sub(r"[\s_\-]+", " ", str(label)).strip().casefold()


def disagreement(table: pa.Table) -> np.ndarray:
    """1.0 where the LLM's label and the task model's predicted label differ (both present), else 0.0."""
    if PREDICTED_LABEL not in table.column_names:
        return np.zeros(table.num_rows)
    llm = label_names(table)
    task = np.array([_normalised(v) for v in table.column(PREDICTED_LABEL).to_pylist()], dtype=object)
    return ((llm != task) & (llm != "") & (task != "")).astype(np.float64)


def fill_spreading_labels(ranked: dict[int, list[int]], quotas: np.ndarray, labels: np.ndarray,
                          try_take: Callable[[int], bool]) -> None:
    """Fill each cluster's quota from ``ranked`` (its candidates, best first), one document per cluster per pass
    (largest quota first): a cluster takes its best-ranked remaining candidate among those whose label has the
    fewest documents taken so far. ``try_take`` takes a row or refuses it (a near-duplicate)."""
    taken_per_label: Counter = Counter()
    remaining = {c: list(rows) for c, rows in ranked.items()}
    got = dict.fromkeys(ranked, 0)
    active = [c for c in sorted(ranked, key=lambda c: (-int(quotas[c]), c)) if quotas[c] > 0]
    while active:
        for c in active:
            rows = remaining[c]
            while rows:
                best = min(range(len(rows)), key=lambda j: (taken_per_label[labels[rows[j]]], j))
                i = rows.pop(best)
                if try_take(i):
                    taken_per_label[labels[i]] += 1
                    got[c] += 1
                    break
        active = [c for c in active if got[c] < quotas[c] and remaining[c]]
