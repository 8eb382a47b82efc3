"""Select stage: ``budget`` documents from scored candidates, mixing cluster quotas with uncertainty.

Rules (DESIGN.md section 6; ``bench/quality.py`` measures them):
- ``typical_uncertain``: quotas proportional to cluster size; within a cluster, candidates ranked by
  uncertainty percentile minus ``typicality_weight`` x distance-to-centroid percentile (both among that
  cluster's candidates), so uncertain documents win unless they are the cluster's outliers.
- ``baseline``: quotas proportional to cluster size; within a cluster the most uncertain candidates.
- ``uncertainty_weighted``: quotas proportional to size x mean candidate uncertainty.
- ``round_robin``: clusters visited largest first, one most-uncertain document each per round.
- ``entropy_only``: the most uncertain candidates, clusters ignored.
- ``cluster_only`` (default, with ``quota: cover`` and one cluster per label): nearest to centroid, no LLM
  score needed. Picked leave-one-dataset-out: with k = budget it visits the budget's modes one typical document
  each, as TypiClust does. An LLM preference within a cluster stays out of the default until it beats the
  floor out of sample.
- ``stratified``: uniform within each cluster (smallest random keys), no LLM score needed: a random sample with
  less variance in what it covers, the floor every other rule is measured against.
``quota`` splits the budget over clusters: ``size`` proportionally to cluster size; ``cover`` one document per
cluster first (largest clusters first when there are more clusters than slots), the rest by size. With a task
model (labels), ``labels_quota`` splits it instead; its default, ``uncertainty``, weighs each cluster's size by
its mean uncertainty (negative margin) above the most certain cluster's, so confident regions get few labels;
within a cluster the lowest margin + ``margin_distance_weight`` x distance to the centroid wins.
Near-duplicates (cosine above ``dedup_threshold`` to an already-selected document) are skipped; if the
quotas cannot be filled, the remaining slots go to the best remaining candidates overall.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from labelnext.ops.cluster.candidates import proportional_quotas, seeded_ranks, weighted_by_distance
from labelnext.ops.core.columns import (CLUSTER_ID, DISTANCE, DOC_ID, EMBEDDING, LLM_COLUMNS, MARGIN, PREDICTED_LABEL,
                                        RAND_KEY, RULE, SCORE_COLUMNS, SELECTED_COLUMNS)
from labelnext.ops.core.contract import StageContract
from labelnext.ops.select.llm_labels import LLM_LABEL, disagreement, fill_spreading_labels, label_names
from labelnext.ops.select.near_duplicates import NearDuplicates, embedding_matrix, near_duplicates
from labelnext.ops.select.task_model import TaskModelConfig, class_balance_tilt
from typing import Literal, Optional

from pydantic import Field, ValidationInfo, field_validator

from labelnext.ops.core.settings import StageSettings


class SelectConfig(StageSettings):
    """``select``: the selection rule and its knobs."""

    rule: Literal[
        "typical_uncertain", "baseline", "uncertainty_weighted", "round_robin", "entropy_only", "cluster_only",
        "stratified",
    ] = Field(default="cluster_only", description="how documents are ranked within the cluster quotas: cluster_only "
              "(nearest the centroid) and stratified (random) need no LLM; the other rules rank by the LLM's scores "
              "and turn the score stage on. The default was chosen leave-one-dataset-out by bench/quality.py "
              "(bench/README.md)")
    score: Literal["mean_entropy", "nll", "max_entropy"] = Field(
        default="mean_entropy", description="the LLM score that rules ranking by the LLM use: mean token entropy, "
        "negative log-likelihood or the largest token entropy")
    quota: Literal["size", "cover"] = Field(default="cover", description="split of the budget over clusters: "
                                            "proportional to size, or one per cluster first then by size")
    typicality_weight: float = Field(default=1.0, ge=0, description="typical_uncertain: weight of the distance-"
                                     "to-centroid percentile against the uncertainty percentile")
    entropy_cap_quantile: Optional[float] = Field(default=None, gt=0, le=1, description="scores above this "
                                                  "quantile rank last (garbled text, tables, foreign scripts); "
                                                  "unset: no cap")
    dedup_threshold: float = Field(default=0.95, gt=0, le=1, description="cosine similarity above which docs are near-duplicates")
    seed: int = Field(default=0, description="seed of the per-document random keys: the "
                      "candidates' diverse share, tie-breaks, the token sample and the report's samples")
    llm_with_labels: bool = Field(default=False, description="with labels, still score candidates with the LLM; "
                                  "its entropy then breaks near-ties of the margin")
    labels_quota: Literal["uncertainty", "size", "cover"] = Field(
        default="uncertainty", description="with labels, the split of the budget over clusters: proportional to "
        "size x how much less certain the task model is in the cluster than in the most certain one, to size, or "
        "as the cold start's quota (bench/quality.py --rounds measured them)")
    margin_distance_weight: float = Field(
        default=0.5, ge=0, description="with labels, documents are ranked within their cluster by margin + this x "
        "distance to the centroid: uncertain documents from the dense part of a cluster first (0: the margin "
        "alone; bench/quality.py --rounds chose it)")
    class_balance: float = Field(default=0.0, ge=0, le=1, description="with labels, tilt cluster quotas towards "
                                 "rare predicted labels (0 off, 1 full inverse class frequency)")
    llm_label_quota: bool = Field(
        default=False, description="cold start with a task prompt (score.task.choices): fill the cluster quotas "
        "one document per cluster per pass, each from the LLM's predicted labels least represented in the "
        "selection so far, so the budget also spreads over the predicted labels (turns the LLM on; "
        "bench/quality.py --task measures it)")
    llm_disagreement: float = Field(
        default=0.0, ge=0, description="with labels and llm_with_labels, a candidate whose LLM label "
        "(score.task.choices) differs from the task model's predicted label ranks as if its margin were this "
        "much smaller (0: off; bench/quality.py --task --rounds measures it)")
    audit_share: float = Field(
        default=0.05, ge=0, lt=0.5, description="with a task model, the share of the budget drawn as a uniform "
        "random sample of the eligible documents (rule 'audit' in selected/); once labelled, the next night scores "
        "the task model that existed before them on them: an unbiased accuracy and macro-F1 with an interval "
        "(0: no audit, no learning curve, and select.rules cannot follow the evidence)")
    audit_confidence: float = Field(default=0.95, gt=0.5, lt=1, description="confidence level of the audited "
                                    "accuracy's and macro-F1's intervals")
    rules: list[Literal["cluster_margin", "margin", "coverage", "llm"]] = Field(
        default_factory=lambda: ["cluster_margin"], min_length=1, description="with a task model, the rules the "
        "non-audit budget is split between: cluster_margin (Cluster-Margin, the default), margin (the lowest "
        "margins, clusters ignored), coverage (nearest each centroid, as a cold start), llm (Cluster-Margin with "
        "the task-aware LLM's entropy and disagreement; needs score.task.choices). With several, a bandit over "
        "the rules (Active Learning by Learning) gives each a share from the audit's evidence (docs/nightly.md)")
    rules_explore: float = Field(default=0.05, ge=0, le=1, description="with several select.rules, the share of "
                                 "the non-audit budget spread evenly over them whatever the evidence, so every "
                                 "rule keeps being measured (chosen leave-one-dataset-out with rules_lead by "
                                 "bench/quality.py --rounds: bench/README.md)")
    rules_lead: float = Field(default=3.0, ge=0, description="with several select.rules, the standard errors "
                              "of evidence the first rule (the incumbent) starts ahead: another rule takes its "
                              "budget only on evidence that it pays more, not on a small audit's noise")
    task_model: TaskModelConfig = Field(default_factory=TaskModelConfig, description="the classifier trained on "
                                        "the labels; with labels its margin ranks documents within cluster quotas "
                                        "(Cluster-Margin)")

    @field_validator("rules")
    @classmethod
    def _distinct_rules(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"lists a rule twice: {v}")
        return v

    @field_validator("llm_disagreement")
    @classmethod
    def _disagreement_needs_the_llm(cls, v: float, info: ValidationInfo) -> float:
        if v > 0 and not info.data.get("llm_with_labels", False):
            raise ValueError("needs select.llm_with_labels: true (with labels the LLM scores candidates only then)")
        return v


NO_LLM_RULES = frozenset({"cluster_only", "stratified"})


def uses_llm(cfg: SelectConfig) -> bool:
    """Whether the rule ranks by LLM scores or the quotas use its labels (the score stage runs only then)."""
    return cfg.rule not in NO_LLM_RULES or cfg.llm_label_quota


def contract(cfg: SelectConfig, margin: bool = False) -> StageContract:
    """``cluster_only`` and ``stratified`` need no LLM scores, nor does a task model's margin; other rules do."""
    scores = SCORE_COLUMNS if uses_llm(cfg) and not margin else ()
    if cfg.llm_label_quota and not margin:
        scores = (*scores, LLM_LABEL)
    return StageContract("select", needs=(DOC_ID, CLUSTER_ID, DISTANCE, RAND_KEY, EMBEDDING, *scores),
                         adds=SELECTED_COLUMNS)

_SCORE_FIELD = {"mean_entropy": "uncertainty", "nll": "nll", "max_entropy": "max_entropy"}


def priority(table: pa.Table, cfg: SelectConfig) -> np.ndarray:
    """Higher is picked first. NaN scores (no tokens) sort last."""
    if MARGIN in table.column_names:
        return margin_priority(table, cfg)
    distance = table.column(DISTANCE).to_numpy().astype(np.float64)
    if cfg.rule == "cluster_only":
        return -distance
    if cfg.rule == "stratified":
        return np.zeros(table.num_rows)  # every row ties: the random-key tie-break decides
    score = table.column(_SCORE_FIELD[cfg.score]).to_numpy(zero_copy_only=False).astype(np.float64)
    if cfg.entropy_cap_quantile is not None and np.isfinite(score).any():
        cap = np.nanquantile(score, cfg.entropy_cap_quantile)
        # Outliers above the cap are treated as least informative (garbled text, tables, foreign scripts).
        score = np.where(score > cap, -score, score)
    finite = np.isfinite(score)
    score = np.where(finite, score, -np.inf)
    if cfg.rule == "typical_uncertain":
        clusters = table.column(CLUSTER_ID).to_numpy()
        mixed = percentile_within(score, clusters) - cfg.typicality_weight * percentile_within(distance, clusters)
        return np.where(finite, mixed, -np.inf)
    return score


LABELS_ENTROPY_WEIGHT = 0.25  # bench/loop.py's "labelnext+entropy": entropy only breaks near-ties of the margin


def margin_priority(table: pa.Table, cfg: SelectConfig) -> np.ndarray:
    """With a task model, whatever the rule: the lowest margin + ``margin_distance_weight`` x distance to the
    centroid first (the candidates stage ranks by the same key); with ``llm_with_labels`` and LLM scores, that
    key's percentile minus a quarter of the entropy percentile (per cluster)."""
    margin = weighted_by_distance(table, MARGIN, cfg.margin_distance_weight)
    if cfg.llm_disagreement > 0 and LLM_LABEL in table.column_names:
        margin = margin - cfg.llm_disagreement * disagreement(table)
    finite = np.isfinite(margin)
    if not (cfg.llm_with_labels and "uncertainty" in table.column_names):
        return np.where(finite, -margin, -np.inf)
    entropy = table.column("uncertainty").to_numpy(zero_copy_only=False).astype(np.float64)
    clusters = table.column(CLUSTER_ID).to_numpy()
    mixed = (percentile_within(np.where(finite, margin, np.inf), clusters)
             - LABELS_ENTROPY_WEIGHT * percentile_within(np.where(np.isfinite(entropy), entropy, -np.inf), clusters))
    return np.where(finite, -mixed, -np.inf)


def percentile_within(values: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Rank of each value among its cluster's values, scaled to [0, 1]; ties share their average rank, so the
    result does not depend on row order. A cluster with one row gives 0."""
    n = len(values)
    if n == 0:
        return np.zeros(0)
    order = np.lexsort((values, clusters))
    c, v = clusters[order], values[order]
    first = np.searchsorted(c, c, side="left")
    size = np.searchsorted(c, c, side="right") - first
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (c[1:] != c[:-1]) | (v[1:] != v[:-1])
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    counts = np.diff(np.append(starts, n))
    mean_pos = starts[group] + (counts[group] - 1) / 2.0
    out = np.empty(n)
    out[order] = (mean_pos - first) / np.maximum(size - 1, 1)
    return out


def cover_quotas(weights: np.ndarray, total: int, capacity: np.ndarray) -> np.ndarray:
    """One slot per cluster with capacity (heaviest first when there are more clusters than slots), the rest
    proportional to ``weights``: small modes are visited, which size-proportional quotas alone skip."""
    weights = np.asarray(weights, dtype=np.float64)
    capacity = np.where(weights > 0, np.asarray(capacity, dtype=np.int64), 0)
    open_ = np.flatnonzero(capacity > 0)
    first = open_[np.lexsort((open_, -weights[open_]))][: max(int(total), 0)]
    quotas = np.zeros(len(weights), dtype=np.int64)
    quotas[first] = 1
    return quotas + proportional_quotas(weights, int(total) - len(first), capacity=capacity - quotas)


def uncertainty_tilt(clusters: np.ndarray, signal: np.ndarray, k: int) -> np.ndarray:
    """Per cluster: its mean finite ``signal`` (higher = less certain) above the lowest cluster mean, plus 1e-3;
    clusters without a finite value get 1e-3."""
    finite = np.isfinite(signal)
    counts = np.bincount(clusters[finite], minlength=k)
    sums = np.bincount(clusters[finite], weights=signal[finite], minlength=k)
    means = np.divide(sums, counts, out=np.zeros(k), where=counts > 0)
    floor = means[counts > 0].min() if (counts > 0).any() else 0.0
    return np.where(counts > 0, means - floor + 1e-3, 1e-3)


def _ranked_within(clusters: np.ndarray, prio: np.ndarray, tiebreak: np.ndarray) -> dict[int, list[int]]:
    order = np.lexsort((tiebreak, -prio, clusters))
    out: dict[int, list[int]] = {}
    for i in order:
        out.setdefault(int(clusters[i]), []).append(int(i))
    return out


class Selector:
    near_duplicates = NearDuplicates  # the near-duplicate check (tests and bench swap in the exhaustive one)

    def __init__(self, cfg: SelectConfig, label_counts: Optional[dict[str, int]] = None, rule: Optional[str] = None):
        self.cfg = cfg
        self.label_counts = label_counts or {}  # labels so far per class: select.class_balance tilts by them
        self.rule = rule  # the output's rule column; default: cluster_margin with a margin, else cold_start

    def quotas(self, sizes: np.ndarray, table: pa.Table, prio: np.ndarray, budget: int) -> np.ndarray:
        clusters = table.column(CLUSTER_ID).to_numpy()
        available = np.bincount(clusters, minlength=len(sizes))
        weights = np.where(available > 0, sizes, 0).astype(np.float64)
        has_margin = MARGIN in table.column_names
        quota = self.cfg.labels_quota if has_margin else self.cfg.quota
        if self.cfg.rule == "uncertainty_weighted" or quota == "uncertainty":
            # With labels, the margin itself (prio may mix in within-cluster entropy percentiles).
            signal = (-table.column(MARGIN).to_numpy(zero_copy_only=False).astype(np.float64) if has_margin
                      else prio)
            weights = weights * uncertainty_tilt(clusters, signal, len(sizes))
        if self.cfg.class_balance > 0 and PREDICTED_LABEL in table.column_names:
            predicted = np.array(table.column(PREDICTED_LABEL).to_pylist(), dtype=object)
            weights = weights * class_balance_tilt(clusters, predicted, self.label_counts, len(sizes),
                                                   self.cfg.class_balance)
        if quota == "cover":
            return cover_quotas(weights, budget, available)
        return proportional_quotas(weights, budget, capacity=available)

    # One BLAS thread: the near-duplicate check's many small products stall on thread hand-offs otherwise.
    @threadpool_limits.wrap(limits=1, user_api="blas")
    def select(self, candidates: pa.Table, sizes: np.ndarray, budget: int) -> pa.Table:
        n = candidates.num_rows
        budget = int(min(budget, n))
        rule = self.rule or ("cluster_margin" if MARGIN in candidates.column_names else "cold_start")
        if budget <= 0:
            return self._output(candidates, np.empty(0, np.int64), [], sizes, rule)
        prio = priority(candidates, self.cfg)
        tiebreak = seeded_ranks(candidates)
        clusters = candidates.column(CLUSTER_ID).to_numpy()
        duplicates = near_duplicates(_embeddings(candidates), self.cfg.dedup_threshold, budget, self.near_duplicates)
        chosen: list[int] = []
        reasons: list[str] = []
        taken = np.zeros(n, dtype=bool)

        def try_take(i: int, reason: str, dedup: bool = True) -> bool:
            if taken[i]:
                return False
            if dedup and duplicates is not None and duplicates.is_near_duplicate(i):
                return False
            taken[i] = True
            chosen.append(i)
            reasons.append(reason)
            if duplicates is not None:
                duplicates.add(i)
            return True

        if self.cfg.rule == "entropy_only":
            if duplicates is not None:
                duplicates.expect(np.lexsort((tiebreak, -prio)))
            for i in np.lexsort((tiebreak, -prio)):
                if len(chosen) >= budget:
                    break
                try_take(int(i), "uncertainty")
        elif self.cfg.rule == "round_robin":
            ranked = _ranked_within(clusters, prio, tiebreak)
            visit = sorted(ranked, key=lambda c: (-sizes[c], c))
            cursors = {c: 0 for c in visit}
            while len(chosen) < budget and any(cursors[c] < len(ranked[c]) for c in visit):
                for c in visit:
                    while cursors[c] < len(ranked[c]):
                        i = ranked[c][cursors[c]]
                        cursors[c] += 1
                        if try_take(i, "round_robin"):
                            break
                    if len(chosen) >= budget:
                        break
        else:
            reason = {"cluster_only": "cluster_representative", "stratified": "cluster_quota_random",
                      "typical_uncertain": "cluster_quota_typical_uncertain"}.get(self.cfg.rule,
                                                                                "cluster_quota_uncertainty")
            if MARGIN in candidates.column_names:
                reason = "cluster_quota_margin"
            quotas = self.quotas(sizes, candidates, prio, budget)
            ranked = _ranked_within(clusters, prio, tiebreak)
            if duplicates is not None:
                duplicates.expect(_quota_try_order(ranked, quotas))
            if self.cfg.llm_label_quota and MARGIN not in candidates.column_names:
                fill_spreading_labels(ranked, quotas, label_names(candidates), lambda i: try_take(i, reason))
            else:
                for c in sorted(ranked):
                    got = 0
                    for i in ranked[c]:
                        if got >= quotas[c]:
                            break
                        got += try_take(i, reason)
        # Fill: best remaining overall, first respecting near-duplicate removal, then not.
        fill_order = [int(i) for i in np.lexsort((tiebreak, -prio))]
        if duplicates is not None and len(chosen) < budget:
            duplicates.expect(fill_order)
        for dedup in (True, False):
            for i in fill_order:
                if len(chosen) >= budget:
                    break
                try_take(i, "fill", dedup=dedup)
        return self._output(candidates, np.array(chosen, dtype=np.int64), reasons, sizes, rule)

    @staticmethod
    def _output(candidates: pa.Table, idx: np.ndarray, reasons: list[str], sizes: np.ndarray,
                rule: str) -> pa.Table:
        rows = candidates.take(pa.array(idx, pa.int64()))
        clusters = rows.column(CLUSTER_ID).to_numpy() if rows.num_rows else np.empty(0, np.int64)
        cols = {
            "doc_id": rows.column("doc_id"),
            "rank": pa.array(np.arange(1, rows.num_rows + 1, dtype=np.int32)),
            "cluster_id": pa.array(clusters.astype(np.int32)),
            "cluster_size": pa.array(np.asarray(sizes, dtype=np.int64)[clusters] if rows.num_rows else np.empty(0, np.int64)),
            "uncertainty": _col(rows, "uncertainty", pa.float64()),
            "nll": _col(rows, "nll", pa.float64()),
            "n_tokens": _col(rows, "n_tokens", pa.int64()),
            "distance_to_centroid": rows.column(DISTANCE).cast(pa.float64()),
            "reason": pa.array(reasons, pa.string()),
            PREDICTED_LABEL: _col(rows, PREDICTED_LABEL, pa.string()),
            MARGIN: _col(rows, MARGIN, pa.float64()),
            RULE: pa.array([rule] * rows.num_rows, pa.string()),
        }
        cols.update({name: rows.column(name) for name in LLM_COLUMNS if name in rows.column_names})
        return pa.table(cols)


def _quota_try_order(ranked: dict[int, list[int]], quotas: np.ndarray) -> list[int]:
    """The order the quota loop tries candidates in: each cluster's quota first, then (after near-duplicates
    were skipped) the cluster's next ones."""
    clusters = sorted(ranked)
    return ([i for c in clusters for i in ranked[c][:quotas[c]]]
            + [i for c in clusters for i in ranked[c][quotas[c]:]])


def _col(table: pa.Table, name: str, type_: pa.DataType) -> pa.Array:
    if name in table.column_names:
        return table.column(name).cast(type_)
    return pa.nulls(table.num_rows, type_)


def _embeddings(table: pa.Table) -> Optional[np.ndarray]:
    if EMBEDDING not in table.column_names or table.num_rows == 0:
        return None
    return embedding_matrix(table.column(EMBEDDING))
