"""Published cold-start anchors from scikit-activeml (its defaults): TypiClust and ProbCover.

Both query ``budget`` pool positions given the pool's embeddings and the labels bought so far (``labelled``
positions with their labels; empty on a cold start). They are a dev dependency of the bench, never of the
product.
"""

from __future__ import annotations

import warnings

import numpy as np

ANCHORS = ("typiclust", "probcover")


def query(name: str, emb: np.ndarray, labelled: np.ndarray, labels: np.ndarray, budget: int,
          seed: int) -> np.ndarray:
    """Pool positions the anchor ``name`` would send to annotators next (never one of ``labelled``)."""
    from skactiveml.pool import ProbCover, TypiClust
    from skactiveml.utils import MISSING_LABEL

    n = len(emb)
    budget = int(min(budget, n - len(labelled)))
    if budget <= 0:
        return np.empty(0, np.int64)
    # skactiveml marks unlabelled rows with a missing label; class names become integer codes.
    y = np.full(n, MISSING_LABEL, dtype=np.float64)
    if len(labelled):
        y[labelled] = np.unique(np.asarray(labels).astype(str), return_inverse=True)[1]
    strategy = {"typiclust": TypiClust, "probcover": ProbCover}[name](random_state=seed)
    with warnings.catch_warnings():
        # ProbCover warns when no radius reaches its purity target and falls back to the smallest one.
        warnings.simplefilter("ignore")
        picked = strategy.query(X=np.asarray(emb, dtype=np.float64), y=y, batch_size=budget)
    return np.asarray(picked, dtype=np.int64)


class ColdStartAnchors:
    """The anchors' cold-start picks for one pool. ProbCover is greedy, so its first ``b`` picks for a budget
    ``B >= b`` are exactly its picks for ``b``: it is queried once per seed at the largest budget (its n x n
    coverage graph is the bench's most expensive step) and every smaller budget takes a prefix."""

    def __init__(self, emb: np.ndarray, max_budget: int):
        self.emb, self.max_budget = emb, max_budget
        self._probcover: dict[int, np.ndarray] = {}

    def pick(self, name: str, budget: int, seed: int) -> np.ndarray:
        none = np.empty(0, np.int64)
        if name != "probcover" or budget > self.max_budget:
            return query(name, self.emb, none, none, budget, seed)
        if seed not in self._probcover:
            self._probcover[seed] = query(name, self.emb, none, none, self.max_budget, seed)
        return self._probcover[seed][:budget]
