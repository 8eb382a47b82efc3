"""Select stage: ``budget`` documents from scored candidates, mixing cluster quotas with uncertainty.

Rules (DESIGN.md section 6; ``bench/quality.py`` measures them):
- ``typical_uncertain`` (default): quotas proportional to cluster size; within a cluster, candidates ranked by
  uncertainty percentile minus ``typicality_weight`` x distance-to-centroid percentile (both among that
  cluster's candidates), so uncertain documents win unless they are the cluster's outliers.
- ``baseline``: quotas proportional to cluster size; within a cluster the most uncertain candidates.
- ``uncertainty_weighted``: quotas proportional to size x mean candidate uncertainty.
- ``round_robin``: clusters visited largest first, one most-uncertain document each per round.
- ``entropy_only``: the most uncertain candidates, clusters ignored.
- ``cluster_only``: nearest to centroid, no LLM score needed.
Near-duplicates (cosine above ``dedup_threshold`` to an already-selected document) are skipped; if the
quotas cannot be filled, the remaining slots go to the best remaining candidates overall.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from labelnext.ops.candidates import proportional_quotas
from labelnext.ops.columns import CLUSTER_ID, DISTANCE, DOC_ID, EMBEDDING, RAND_KEY, SCORE_COLUMNS, SELECTED_COLUMNS
from labelnext.ops.contract import StageContract
from typing import Literal, Optional

from pydantic import Field

from labelnext.ops.settings import StageSettings


class SelectConfig(StageSettings):
    """``select``: the selection rule and its knobs."""

    rule: Literal[
        "typical_uncertain", "baseline", "uncertainty_weighted", "round_robin", "entropy_only", "cluster_only"
    ] = Field(default="typical_uncertain", description="chosen by bench/quality.py (bench/README.md)")
    score: Literal["mean_entropy", "nll", "max_entropy"] = "mean_entropy"
    typicality_weight: float = Field(default=1.0, ge=0, description="typical_uncertain: weight of the distance-"
                                     "to-centroid percentile against the uncertainty percentile")
    entropy_cap_quantile: Optional[float] = Field(default=None, gt=0, le=1)
    dedup_threshold: float = Field(default=0.95, gt=0, le=1, description="cosine similarity above which docs are near-duplicates")
    seed: int = 0



def contract(cfg: SelectConfig) -> StageContract:
    """``cluster_only`` needs no LLM scores; every other rule ranks by them."""
    scores = () if cfg.rule == "cluster_only" else SCORE_COLUMNS
    return StageContract("select", needs=(DOC_ID, CLUSTER_ID, DISTANCE, RAND_KEY, EMBEDDING, *scores),
                         adds=SELECTED_COLUMNS)

_SCORE_FIELD = {"mean_entropy": "uncertainty", "nll": "nll", "max_entropy": "max_entropy"}


def priority(table: pa.Table, cfg: SelectConfig) -> np.ndarray:
    """Higher is picked first. NaN scores (no tokens) sort last."""
    distance = table.column(DISTANCE).to_numpy().astype(np.float64)
    if cfg.rule == "cluster_only":
        return -distance
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


def _ranked_within(clusters: np.ndarray, prio: np.ndarray, tiebreak: np.ndarray) -> dict[int, list[int]]:
    order = np.lexsort((tiebreak, -prio, clusters))
    out: dict[int, list[int]] = {}
    for i in order:
        out.setdefault(int(clusters[i]), []).append(int(i))
    return out


class Selector:
    def __init__(self, cfg: SelectConfig):
        self.cfg = cfg

    def quotas(self, sizes: np.ndarray, table: pa.Table, prio: np.ndarray, budget: int) -> np.ndarray:
        clusters = table.column(CLUSTER_ID).to_numpy()
        available = np.bincount(clusters, minlength=len(sizes))
        weights = np.where(available > 0, sizes, 0).astype(np.float64)
        if self.cfg.rule == "uncertainty_weighted":
            finite = np.isfinite(prio)
            means = np.array([prio[(clusters == c) & finite].mean() if ((clusters == c) & finite).any() else 0.0
                              for c in range(len(sizes))])
            floor = means[available > 0].min() if (available > 0).any() else 0.0
            weights = weights * (means - floor + 1e-3)
        return proportional_quotas(weights, budget, capacity=available)

    def select(self, candidates: pa.Table, sizes: np.ndarray, budget: int) -> pa.Table:
        n = candidates.num_rows
        budget = int(min(budget, n))
        if budget <= 0:
            return self._output(candidates, np.empty(0, np.int64), [], sizes)
        prio = priority(candidates, self.cfg)
        tiebreak = candidates.column(RAND_KEY).to_numpy() if RAND_KEY in candidates.column_names else np.arange(n)
        clusters = candidates.column(CLUSTER_ID).to_numpy()
        emb = _embeddings(candidates)
        chosen: list[int] = []
        reasons: list[str] = []
        taken = np.zeros(n, dtype=bool)

        def try_take(i: int, reason: str, dedup: bool = True) -> bool:
            if taken[i]:
                return False
            if dedup and emb is not None and chosen:
                if float(np.max(emb[chosen] @ emb[i])) > self.cfg.dedup_threshold:
                    return False
            taken[i] = True
            chosen.append(i)
            reasons.append(reason)
            return True

        if self.cfg.rule == "entropy_only":
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
            reason = {"cluster_only": "cluster_representative",
                      "typical_uncertain": "cluster_quota_typical_uncertain"}.get(self.cfg.rule,
                                                                                "cluster_quota_uncertainty")
            quotas = self.quotas(sizes, candidates, prio, budget)
            ranked = _ranked_within(clusters, prio, tiebreak)
            for c in sorted(ranked):
                got = 0
                for i in ranked[c]:
                    if got >= quotas[c]:
                        break
                    got += try_take(i, reason)
        # Fill: best remaining overall, first respecting near-duplicate removal, then not.
        fill_order = [int(i) for i in np.lexsort((tiebreak, -prio))]
        for dedup in (True, False):
            for i in fill_order:
                if len(chosen) >= budget:
                    break
                try_take(i, "fill", dedup=dedup)
        return self._output(candidates, np.array(chosen, dtype=np.int64), reasons, sizes)

    @staticmethod
    def _output(candidates: pa.Table, idx: np.ndarray, reasons: list[str], sizes: np.ndarray) -> pa.Table:
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
        }
        return pa.table(cols)


def _col(table: pa.Table, name: str, type_: pa.DataType) -> pa.Array:
    if name in table.column_names:
        return table.column(name).cast(type_)
    return pa.nulls(table.num_rows, type_)


def _embeddings(table: pa.Table):
    if "embedding" not in table.column_names:
        return None
    col = table.column("embedding").to_pylist()
    return np.asarray(col, dtype=np.float32) if col else None
