"""Candidate stage: per-cluster quotas of documents that go to the LLM (nearest + a diverse share).

Works as a distributed top-k over slim columns (doc_id, cluster, distance, random key): each block keeps at
most its cluster's quota of nearest rows and of smallest random keys (:func:`block_candidates`), then each
cluster's partial lists are merged in one place (:func:`merge_candidates`, a Ray Data groupby in the
pipeline), which gives the exact global answer. Ties go to the seeded random key, never to row order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labelnext.ops.core.columns import CANDIDATE_REASON, CLUSTER_ID, DISTANCE, DOC_ID, MARGIN, RAND_KEY
from labelnext.ops.core.contract import StageContract
from labelnext.ops.core.settings import StageSettings
from pydantic import Field


class CandidatesConfig(StageSettings):
    """``candidates``: how many documents the LLM scores per selected one, and the diverse share."""

    factor: float = Field(default=5.0, ge=1.0, description="candidates scored = factor x budget")
    diverse_fraction: float = Field(default=0.3, ge=0.0, le=1.0, description="share of each cluster's "
                                    "candidates drawn at random (seeded) rather than best-ranked")


CONTRACT = StageContract("candidates", needs=(DOC_ID, CLUSTER_ID, DISTANCE, RAND_KEY), adds=(CANDIDATE_REASON,))


def proportional_quotas(weights: np.ndarray, total: int, capacity: np.ndarray | None = None) -> np.ndarray:
    """Split ``total`` proportionally to ``weights`` (largest remainder), never above ``capacity``.

    ``capacity`` defaults to the weights themselves (cluster sizes): a cluster never gets more than it holds.
    """
    weights = np.asarray(weights, dtype=np.float64)
    capacity = np.asarray(weights if capacity is None else capacity, dtype=np.int64)
    capacity = np.where(weights > 0, capacity, 0)
    total = int(min(total, capacity.sum()))
    quotas = np.zeros(len(weights), dtype=np.int64)
    fixed = np.zeros(len(weights), dtype=bool)
    while True:
        free = ~fixed & (capacity > 0)
        left = total - quotas[fixed].sum()
        if left <= 0 or not free.any():
            break
        ideal = np.zeros(len(weights))
        ideal[free] = left * weights[free] / weights[free].sum()
        trial = np.floor(ideal).astype(np.int64)
        # Largest remainder; ties broken by weight then cluster id so the result is deterministic.
        order = np.lexsort((np.arange(len(weights)), -weights, -(ideal - trial)))
        for c in [c for c in order if free[c]][: int(left - trial[free].sum())]:
            trial[c] += 1
        over = free & (trial > capacity)
        if not over.any():
            quotas[free] = trial[free]
            break
        # Clusters that cannot hold their share keep all they have; the rest is shared again.
        quotas[over] = capacity[over]
        fixed |= over
    return quotas


@dataclass(frozen=True)
class CandidatePlan:
    near: np.ndarray  # per-cluster number of nearest-to-centroid candidates
    diverse: np.ndarray  # per-cluster number of random (diverse) candidates
    near_key: str = DISTANCE  # the "near" share takes the smallest values: distance, or a task model's margin
    # With near_key = margin: rank by margin + distance_weight x distance to the centroid (select.
    # margin_distance_weight), so uncertain documents from the dense part of a cluster come first.
    distance_weight: float = 0.0

    @property
    def total(self) -> int:
        return int(self.near.sum() + self.diverse.sum())


def plan_candidates(sizes: np.ndarray, budget: int, cfg: CandidatesConfig, near_key: str = DISTANCE,
                    distance_weight: float = 0.0) -> CandidatePlan:
    total = math.ceil(cfg.factor * budget)
    quotas = proportional_quotas(sizes, total)
    near = np.ceil(quotas * (1.0 - cfg.diverse_fraction)).astype(np.int64)
    near = np.minimum(near, quotas)
    return CandidatePlan(near=near, diverse=quotas - near, near_key=near_key,
                         distance_weight=distance_weight if near_key != DISTANCE else 0.0)


_NEAR_SCORE = "_near_score"


def weighted_by_distance(table: pa.Table, key: str, distance_weight: float) -> np.ndarray:
    """``key`` + ``distance_weight`` x distance to the centroid, per row: the with-labels ranking key (smaller
    first) that the candidates stage and the ``Selector`` share."""
    values = table.column(key).to_numpy(zero_copy_only=False).astype(np.float64)
    if distance_weight:
        values = values + distance_weight * table.column(DISTANCE).to_numpy(zero_copy_only=False).astype(np.float64)
    return values


def _near_ranked(table: pa.Table, plan: CandidatePlan) -> tuple[pa.Table, str]:
    """``table`` and the column the "near" share takes the smallest values of: ``plan.near_key``, or (with a
    distance weight) a temporary column of :func:`weighted_by_distance`."""
    if plan.distance_weight == 0.0:
        return table, plan.near_key
    score = weighted_by_distance(table, plan.near_key, plan.distance_weight)
    return table.append_column(_NEAR_SCORE, pa.array(score, pa.float64())), _NEAR_SCORE


def _top_per_cluster(table: pa.Table, key: str, limits: np.ndarray) -> np.ndarray:
    """Row indices of the ``limits[c]`` smallest ``key`` values within each cluster c.

    Ties go to the smaller seeded random key, then the smaller doc_id: a total order, so a block's top rows
    always hold the global answer's rows and nothing depends on row order or block layout.
    """
    sort_keys = [(name, "ascending") for name in dict.fromkeys((CLUSTER_ID, key, RAND_KEY, DOC_ID))]
    order = pc.sort_indices(table, sort_keys=sort_keys).to_numpy().astype(np.int64)
    sorted_clusters = table.column(CLUSTER_ID).to_numpy()[order]
    starts = np.searchsorted(sorted_clusters, sorted_clusters, side="left")
    rank_in_cluster = np.arange(len(order)) - starts
    keep = rank_in_cluster < limits[sorted_clusters]
    return order[keep]


def seeded_ranks(table: pa.Table) -> np.ndarray:
    """Each row's position in the seeded order (random key, then doc_id): the tie-break wherever values are
    equal, so a selection never depends on row order or block layout."""
    order = pc.sort_indices(table, sort_keys=[(RAND_KEY, "ascending"), (DOC_ID, "ascending")]).to_numpy()
    ranks = np.empty(len(order), np.int64)
    ranks[order] = np.arange(len(order))
    return ranks


def block_candidates(table: pa.Table, plan: CandidatePlan) -> pa.Table:
    """Per block: rows that could be in the global answer (nearest or smallest random key)."""
    if table.num_rows == 0:
        return table
    near_idx = _top_per_cluster(*_near_ranked(table, plan), plan.near)
    rand_idx = _top_per_cluster(table, RAND_KEY, plan.near + plan.diverse)
    idx = np.union1d(near_idx, rand_idx)
    return table.take(pa.array(idx, pa.int64()))


def merge_candidates(partial: pa.Table, plan: CandidatePlan) -> pa.Table:
    """Exact global candidates from the union of per-block partial lists, with a ``candidate_reason``."""
    if partial.num_rows == 0:
        return partial.append_column(CANDIDATE_REASON, pa.array([], pa.string()))
    # Deterministic order regardless of block arrival order.
    partial = partial.sort_by([(CLUSTER_ID, "ascending"), ("doc_id", "ascending")])
    near_idx = _top_per_cluster(*_near_ranked(partial, plan), plan.near)
    taken = np.zeros(partial.num_rows, dtype=bool)
    taken[near_idx] = True
    # Diverse share: the smallest random keys among rows not already taken as nearest.
    rest = np.flatnonzero(~taken)
    rest_table = partial.take(pa.array(rest, pa.int64()))
    div_idx = rest[_top_per_cluster(rest_table, RAND_KEY, plan.diverse)]
    reasons = np.full(partial.num_rows, None, dtype=object)
    reasons[near_idx] = "lowest_margin" if plan.near_key == MARGIN else "near_centroid"
    reasons[div_idx] = "diverse"
    keep = np.sort(np.concatenate([near_idx, div_idx]))
    out = partial.take(pa.array(keep, pa.int64()))
    return out.append_column(CANDIDATE_REASON, pa.array(reasons[keep].tolist(), pa.string()))


def cluster_sizes(clusters: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(np.asarray(clusters, dtype=np.int64), minlength=k)


def drop_columns(table: pa.Table, names: list[str]) -> pa.Table:
    return table.drop_columns([n for n in names if n in table.column_names])


def filter_ids(table: pa.Table, ids: pa.Array) -> pa.Table:
    return table.filter(pc.invert(pc.is_in(table.column("doc_id"), value_set=ids)))
