"""Cluster-Margin on plain arrays, as the select stage does it (the loop bench and tests call it)."""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import pyarrow as pa

from labelnext.ops.cluster.kmeans import rand_keys
from labelnext.ops.core.columns import CLUSTER_ID, DISTANCE, DOC_ID, EMBEDDING, MARGIN, PREDICTED_LABEL, RAND_KEY
from labelnext.ops.select.selector import SelectConfig, Selector


def select_by_margin(clusters: np.ndarray, margins: np.ndarray, sizes: np.ndarray, budget: int, *,
                     embeddings: Optional[np.ndarray] = None, predicted: Optional[np.ndarray] = None,
                     label_counts: Optional[Mapping[str, int]] = None, class_balance: float = 0.0,
                     distances: Optional[np.ndarray] = None, margin_distance_weight: Optional[float] = None,
                     dedup_threshold: float = 0.95, seed: int = 0) -> np.ndarray:
    """Cluster-Margin on plain arrays, as the pipeline's select stage does it: row indices, best first.

    Cluster quotas from ``sizes`` as the default ``select.labels_quota`` splits them (tilted by ``class_balance``),
    lowest margin + ``margin_distance_weight`` (default: ``select``'s) x ``distances`` (to the centroid; none: the
    margin alone) first within each cluster, near-duplicates (cosine above ``dedup_threshold`` between ``embeddings`` rows) skipped.
    """
    n = len(margins)
    ids = [str(i) for i in range(n)]
    cols = {DOC_ID: pa.array(ids), CLUSTER_ID: pa.array(np.asarray(clusters, dtype=np.int32)),
            DISTANCE: pa.array(np.zeros(n, np.float32) if distances is None else np.asarray(distances, np.float32)),
            RAND_KEY: pa.array(rand_keys(ids, seed)),
            MARGIN: pa.array(np.asarray(margins, dtype=np.float64))}
    if embeddings is not None:
        cols[EMBEDDING] = pa.array(np.asarray(embeddings, dtype=np.float32).tolist(), pa.list_(pa.float32()))
    if predicted is not None:
        cols[PREDICTED_LABEL] = pa.array(np.asarray(predicted).astype(str).tolist(), pa.string())
    weight = {} if margin_distance_weight is None else {"margin_distance_weight": margin_distance_weight}
    cfg = SelectConfig(class_balance=class_balance, dedup_threshold=dedup_threshold, seed=seed, **weight)
    out = Selector(cfg, label_counts=label_counts).select(pa.table(cols), np.asarray(sizes), budget)
    return np.asarray([int(i) for i in out.column(DOC_ID).to_pylist()], dtype=np.int64)
