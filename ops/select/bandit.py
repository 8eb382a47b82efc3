"""Which selection rule pays on this corpus, and the split of a night's budget that follows the evidence.

The anchor is Active Learning by Learning (Hsu and Lin, AAAI 2015): a bandit over active-learning rules whose
reward is the task model's accuracy estimated without bias, there by importance-weighting the queried points,
here on the audit sample (uniform, so every weight is the same). labelnext selects in nightly batches, where
every configured rule picks some documents every night, so each rule is observed every night and the
exponential weights are computed afresh from all the labels so far rather than updated point by point:

- a rule's evidence is the accuracy on the labelled audit documents that the task model loses when the rule's
  ``m`` most recent labelled picks are left out of its training set (the same ``m`` for every rule, so a rule is
  not credited for having had more of the budget), cross-fitted so no audit document scores a model trained
  on it; its z-statistic (mean loss over its standard error across audit documents, clipped) is the reward;
- the shares are exponential weights of the rewards (a softmax), mixed with ``explore`` spread evenly so every
  rule keeps being measured. Without evidence (no labelled picks or no audit yet) the split is even.

Everything is numpy on label-sized arrays and deterministic for a given set of labels and attributions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from labelnext.ops.select.audit import AUDIT

Z_CAP = 3.0  # a rule's reward saturates at 3 standard errors: one lucky night cannot take the whole budget
ETA = 1.0  # shares grow by e per standard error of evidence


@dataclass(frozen=True)
class RuleEvidence:
    rule: str
    labels: int  # the rule's labelled picks that have a vector
    left_out: int  # how many of them (its most recent) the comparison leaves out: the same for every rule
    audit: int  # labelled audit documents the comparison is scored on
    gain: float  # accuracy on the audit lost without them (NaN: no evidence)
    se: float
    z: float  # gain / se, clipped to +-Z_CAP; 0 without evidence

    def as_dict(self) -> dict:
        return asdict(self)


def rule_evidence(x: np.ndarray, y: np.ndarray, rule_of: np.ndarray, recency: np.ndarray, rules: Sequence[str],
                  fit: Callable[[np.ndarray, np.ndarray], object], folds: int = 5,
                  seed: int = 0) -> dict[str, RuleEvidence]:
    """Each rule's evidence from the labelled documents ``x`` [n, d], ``y`` [n], the rule that picked each
    (``rule_of``; ``"audit"`` for the audit) and how recent each pick is (``recency``, larger is later).

    ``fit(x, y)`` returns a model with ``predict`` (or None when the labels hold one class).
    """
    y = np.asarray(y).astype(str)
    rule_of = np.asarray(rule_of).astype(str)
    audit = np.flatnonzero(rule_of == AUDIT)
    counts = {r: int((rule_of == r).sum()) for r in rules}
    m = min((c for c in counts.values() if c > 0), default=0)
    none = {r: RuleEvidence(r, counts[r], 0, len(audit), float("nan"), float("nan"), 0.0) for r in rules}
    if len(audit) < 2 or m == 0:
        return none
    left_out = {r: _most_recent(np.flatnonzero(rule_of == r), recency, m, seed) for r in rules if counts[r] > 0}
    k = int(min(folds, len(audit)))
    fold_of = np.empty(len(y), np.int64)
    fold_of[audit] = np.random.default_rng(seed).permutation(len(audit)) % k
    base = np.zeros(len(audit), bool)
    without = {r: np.zeros(len(audit), bool) for r in left_out}
    position = {int(i): j for j, i in enumerate(audit)}
    for f in range(k):
        test = audit[fold_of[audit] == f]
        train = np.ones(len(y), bool)
        train[test] = False
        rows = [position[int(i)] for i in test]
        base[rows] = _predict(fit, x, y, train, test) == y[test]
        for r, out in left_out.items():
            kept = train.copy()
            kept[out] = False
            without[r][rows] = _predict(fit, x, y, kept, test) == y[test]
    evidence = dict(none)
    for r, correct in without.items():
        diff = base.astype(np.float64) - correct.astype(np.float64)
        gain = float(diff.mean())
        se = float(diff.std(ddof=1) / np.sqrt(len(diff)))
        z = float(np.clip(gain / se, -Z_CAP, Z_CAP)) if se > 0 else 0.0
        evidence[r] = RuleEvidence(r, counts[r], m, len(audit), gain, se, z)
    return evidence


def _most_recent(rows: np.ndarray, recency: np.ndarray, m: int, seed: int) -> np.ndarray:
    ties = np.random.default_rng(seed + 1).permutation(len(rows))
    order = np.lexsort((ties, -np.asarray(recency, dtype=np.float64)[rows]))
    return rows[order[:m]]


def _predict(fit, x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    model = fit(x[train], y[train]) if np.unique(y[train]).size >= 2 else None
    if model is None:
        values, counts = np.unique(y[train], return_counts=True)
        return np.full(len(test), values[np.argmax(counts)] if len(values) else "", dtype=object).astype(str)
    return np.asarray(model.predict(x[test])).astype(str)


def split_shares(rules: Sequence[str], evidence: Optional[dict[str, RuleEvidence]], explore: float,
                 lead: float = 0.0) -> dict[str, float]:
    """Each rule's share of the non-audit budget: exponential weights of its evidence, ``explore`` spread evenly.

    The first rule is the incumbent: it starts ``lead`` standard errors of evidence ahead, so another rule takes
    its budget only on evidence that it pays more, not on the noise of a small audit.
    """
    z = np.array([(evidence or {}).get(r, None).z if (evidence or {}).get(r) is not None else 0.0 for r in rules])
    if len(z):
        z[0] += lead
    weights = np.exp(ETA * (z - z.max())) if len(z) else z
    soft = weights / weights.sum() if len(z) else weights
    shares = (1 - explore) * soft + explore / max(len(rules), 1)
    return {r: float(s) for r, s in zip(rules, shares)}


def allocate(shares: dict[str, float], n: int) -> dict[str, int]:
    """Whole documents per rule summing to ``n``: floors, then the largest remainders (the earlier rule on ties)."""
    rules = list(shares)
    exact = np.array([shares[r] for r in rules], dtype=np.float64) * n
    counts = np.floor(exact + 1e-9).astype(np.int64)
    rest = int(n - counts.sum())
    order = np.lexsort((np.arange(len(rules)), -(exact - counts)))
    counts[order[:rest]] += 1
    return {r: int(c) for r, c in zip(rules, counts)}
