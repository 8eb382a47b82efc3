"""Tonight's plan in the label loop: the earlier nights as the labels judge them, the rules' evidence and the
split of the budget between ``select.rules`` (``ops/select/bandit.py``), and the audit sample's size."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from labelnext.ops.io.labels import LabelSet, TrainingSet
from labelnext.ops.io.storage import OutputRoot
from labelnext.ops.select.audit import AUDIT, audit_size
from labelnext.ops.select.bandit import RuleEvidence, allocate, rule_evidence, split_shares
from labelnext.ops.select.task_model import TaskModel
from labelnext.pipelines import history
from labelnext.pipelines.config import RunConfig
from labelnext.pipelines.ledger import RunRef

log = logging.getLogger("labelnext")


@dataclass
class LoopPlan:
    rules: list[str]
    shares: dict[str, float]
    evidence: dict[str, RuleEvidence]
    nights: list[dict[str, Any]]  # history.night_rows: the earlier nights as tonight's labels judge them
    audit_share: float
    skipped_nights: int = 0
    planned: dict[str, int] = field(default_factory=dict)  # filled by counts()

    def audit_size(self, budget: int) -> int:
        return audit_size(budget, self.audit_share)

    def counts(self, active_budget: int) -> dict[str, int]:
        self.planned = allocate(self.shares, active_budget)
        return self.planned

    def learning_curve(self) -> list[dict[str, Any]]:
        """One point per audited night: labels its model trained on, audited accuracy and macro-F1, and the
        confidence level of their intervals."""
        keys = ("run_date", "run_id", "labels_before", "audit_n", "accuracy", "accuracy_low", "accuracy_high",
                "macro_f1", "macro_f1_low", "macro_f1_high", "confidence")
        return [{k: row.get(k) for k in keys} for row in self.nights if row["rule"] == AUDIT and row.get("audit_n")]

    def summary(self) -> dict[str, Any]:
        """The manifest's and report.html's view: tonight's split and the learning curve so far."""
        return {"rules": self.rules, "shares": self.shares, "planned": self.planned,
                "evidence": {r: e.as_dict() for r, e in self.evidence.items()},
                "learning_curve": self.learning_curve(), "skipped_nights": self.skipped_nights,
                "rules_by_night": _rules_by_night(self.nights)}


def plan_night(cfg: RunConfig, output: OutputRoot, ref: RunRef, labels: LabelSet,
               train: Optional[TrainingSet]) -> LoopPlan:
    """The plan for a night with labels; ``train`` is the task model's training set (None: none was trained)."""
    sel = cfg.select
    evidence = history.read_evidence(output, ref, labels.doc_ids)
    truth = dict(zip(labels.doc_ids.to_pylist(), labels.labels.to_pylist()))
    nights = history.night_rows(evidence, truth, sel.audit_confidence, sel.seed, ref.run_date)
    rules = list(sel.rules)
    found: dict[str, RuleEvidence] = {}
    if train is not None and len(rules) > 1 and sel.audit_share > 0 and len(train.y):
        attribution = evidence.attribution()
        picked = [attribution.get(str(d), (history.UNATTRIBUTED, -1)) for d in train.ids]
        rule_of = np.array([p[0] for p in picked], dtype=object).astype(str)
        recency = np.array([p[1] for p in picked], dtype=np.float64)
        keep = _evidence_rows(rule_of, sel.task_model.cv_max_labels, sel.task_model.seed)
        c = sel.task_model.c
        found = rule_evidence(train.x[keep], train.y[keep], rule_of[keep], recency[keep], rules,
                              fit=lambda x, y: TaskModel.fit(x, y, c=c), folds=sel.task_model.cv_folds,
                              seed=sel.task_model.seed)
    shares = split_shares(rules, found, sel.rules_explore, sel.rules_lead) if len(rules) > 1 else {rules[0]: 1.0}
    if len(rules) > 1:
        log.info("select: tonight's split %s (evidence z: %s)",
                 ", ".join(f"{r} {s:.0%}" for r, s in shares.items()),
                 ", ".join(f"{r} {found[r].z:+.2f}" if r in found else f"{r} n/a" for r in rules))
    return LoopPlan(rules, shares, found, nights, sel.audit_share if train is not None else 0.0,
                    skipped_nights=len(evidence.skipped))


def _evidence_rows(rule_of: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Rows the evidence trains on: all of them up to ``cap``, else every audit row and a seeded sample of the
    rest (the leave-out fits run folds x (rules + 1) times)."""
    n = len(rule_of)
    if n <= cap:
        return np.arange(n)
    audit = np.flatnonzero(rule_of == AUDIT)
    rest = np.flatnonzero(rule_of != AUDIT)
    take = np.random.default_rng(seed).choice(rest, max(0, cap - len(audit)), replace=False)
    return np.sort(np.concatenate([audit, take]))


def _rules_by_night(nights: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per earlier night, how many documents each rule picked (the shares over the nights)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for row in nights:
        key = (row["run_date"], row["run_id"])
        out.setdefault(key, {"run_date": key[0], "run_id": key[1], "picked": {}})["picked"][row["rule"]] = row["picked"]
    return list(out.values())
