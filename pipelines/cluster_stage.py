"""The cluster stage's warm start: the previous committed run's centroids, when they fit this run."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from labelnext.ops.io.storage import OutputRoot
from labelnext.pipelines import ledger

log = logging.getLogger("labelnext")


def warm_start(output: OutputRoot, run: ledger.RunRef, k: int, dim: int) -> tuple[Optional[np.ndarray], Optional[str]]:
    """The centroids of the committed run before ``run`` and its label, when its k and dimension match."""
    prev = ledger.previous_run(output, run)
    centroids = ledger.load_centroids(output, prev) if prev else None
    if prev is None or centroids is None:
        log.info("cluster: no previous committed run to warm-start from")
        return None, None
    if centroids.shape != (k, dim):
        log.info("cluster: not warm-starting from %s: its centroids are %s, this run needs (%d, %d)",
                 prev.label, centroids.shape, k, dim)
        return None, None
    log.info("cluster: warm start from %s", prev.label)
    return centroids, prev.label
