"""The read stage's helpers: the corpus validated with duplicate ids marked, and the ids left out of the run."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from labelnext.ops.io import read as rd
from labelnext.ops.io.storage import OutputRoot
from labelnext.pipelines import dataflow as flow
from labelnext.pipelines import ledger
from labelnext.pipelines.config import RunConfig

log = logging.getLogger("labelnext")


def validated(fs, tasks: list, cfg: RunConfig, prefix: str, dim: Optional[int], excluded: np.ndarray, total: int):
    """Every corpus row validated, exact duplicate ids marked as rejects (first occurrence kept): the rows
    (lazy: each consumer reads the corpus again), the same rows' slim keys, and the duplicate scan.

    Duplicates are found by a hash shuffle of the slim keys, so the driver never holds a key per row.
    """
    rows = flow.read_corpus(tasks, fs, cfg.input, prefix, dim)
    keys = rows.select_columns(list(rd.KEY_COLUMNS)).materialize()
    scan = flow.duplicate_scan(keys, excluded, total)
    mark = {"fn_kwargs": {"dups": scan.dups}, "batch_format": "pyarrow"}
    return rows.map_batches(flow.mark_duplicates, **mark), keys.map_batches(flow.mark_duplicates, **mark), scan


def exclude(accepted, excluded: np.ndarray):
    """Drop ids the ledger or ``input.exclude_ids`` name (``excluded``: their sorted id hashes)."""
    import ray

    if not excluded.size:
        return accepted
    return accepted.map_batches(ledger.drop_excluded, fn_kwargs={"excluded": ray.put(excluded)},
                                batch_format="pyarrow")


def exclusions(cfg: RunConfig, output: OutputRoot, run: ledger.RunRef, labelled: Optional[np.ndarray]) -> np.ndarray:
    """Sorted id hashes to leave out: the ledger of committed runs dated before ``run`` (so a backfill of an
    earlier night reproduces it), ``input.exclude_ids`` and the ``labelled`` documents' id hashes."""
    parts = []
    if cfg.output.ledger:
        hashes, runs = ledger.ledger_hashes(output, run)
        log.info("ledger: %d ids selected by %d committed runs before %s", hashes.size, len(runs), run.run_date)
        parts.append(hashes)
    if cfg.input.exclude_ids:
        hashes = ledger.user_hashes(cfg.input.exclude_ids, cfg.input.exclude_id_column, cfg.storage)
        log.info("input.exclude_ids: %d ids", hashes.size)
        parts.append(hashes)
    if labelled is not None:
        parts.append(labelled)  # labelled documents are never selected again
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)
