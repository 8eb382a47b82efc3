"""Candidate stage: per-cluster quotas of documents that go to the LLM (nearest + a diverse share).

Works as a distributed top-k: each block keeps at most its cluster's quota of nearest rows and of
smallest random keys; merging those partial lists on the driver gives the exact global answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labelnext.ops.columns import CANDIDATE_REASON, CLUSTER_ID, DISTANCE, DOC_ID, RAND_KEY
from labelnext.ops.contract import StageContract
from labelnext.ops.settings import StageSettings
from pydantic import Field


class CandidatesConfig(StageSettings):
    """``candidates``: how many documents the LLM scores per selected one, and the diverse share."""

    factor: float = Field(default=5.0, ge=1.0, description="candidates scored = factor x budget")
    diverse_fraction: float = Field(default=0.3, ge=0.0, le=1.0)


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

    @property
    def total(self) -> int:
        return int(self.near.sum() + self.diverse.sum())


def plan_candidates(sizes: np.ndarray, budget: int, cfg: CandidatesConfig) -> CandidatePlan:
    total = math.ceil(cfg.factor * budget)
    quotas = proportional_quotas(sizes, total)
    near = np.ceil(quotas * (1.0 - cfg.diverse_fraction)).astype(np.int64)
    near = np.minimum(near, quotas)
    return CandidatePlan(near=near, diverse=quotas - near)


def _top_per_cluster(table: pa.Table, keys: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Row indices of the ``limits[c]`` smallest keys within each cluster c."""
    clusters = table.column(CLUSTER_ID).to_numpy()
    order = np.lexsort((keys, clusters))
    sorted_clusters = clusters[order]
    starts = np.searchsorted(sorted_clusters, sorted_clusters, side="left")
    rank_in_cluster = np.arange(len(order)) - starts
    keep = rank_in_cluster < limits[sorted_clusters]
    return order[keep]


def block_candidates(table: pa.Table, plan: CandidatePlan) -> pa.Table:
    """Per block: rows that could be in the global answer (nearest or smallest random key)."""
    if table.num_rows == 0:
        return table
    dist = table.column(DISTANCE).to_numpy()
    rkey = table.column(RAND_KEY).to_numpy()
    near_idx = _top_per_cluster(table, dist, plan.near)
    rand_idx = _top_per_cluster(table, rkey, plan.near + plan.diverse)
    idx = np.union1d(near_idx, rand_idx)
    return table.take(pa.array(idx, pa.int64()))


def merge_candidates(partial: pa.Table, plan: CandidatePlan) -> pa.Table:
    """Exact global candidates from the union of per-block partial lists, with a ``candidate_reason``."""
    if partial.num_rows == 0:
        return partial.append_column(CANDIDATE_REASON, pa.array([], pa.string()))
    # Deterministic order regardless of block arrival order.
    partial = partial.sort_by([(CLUSTER_ID, "ascending"), ("doc_id", "ascending")])
    dist = partial.column(DISTANCE).to_numpy()
    near_idx = _top_per_cluster(partial, dist, plan.near)
    taken = np.zeros(partial.num_rows, dtype=bool)
    taken[near_idx] = True
    # Diverse share: the smallest random keys among rows not already taken as nearest.
    rest = np.flatnonzero(~taken)
    rest_table = partial.take(pa.array(rest, pa.int64()))
    rkey = rest_table.column(RAND_KEY).to_numpy()
    div_idx = rest[_top_per_cluster(rest_table, rkey, plan.diverse)]
    reasons = np.full(partial.num_rows, None, dtype=object)
    reasons[near_idx] = "near_centroid"
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
