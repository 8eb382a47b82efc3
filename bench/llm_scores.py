"""The LLM scores of pool documents for the quality bench: the real ``Scorer`` (its plain-text uncertainty), every
document scored once and cached on disk by the data file, the model and its window."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import cache_key, log, slug
from bench.datasets import CACHE, Dataset

SCORE_COLUMNS = ("uncertainty", "max_entropy", "nll", "n_tokens", "truncated")
SCORE_CHUNK = 64


def _score_cache_path(ds: Dataset, cfg) -> Path:
    key = cache_key(ds.sha256, cfg.model, cfg.max_tokens, cfg.truncation, cfg.dtype)
    return CACHE / f"scores-{slug(ds.name)}-{key}.parquet"


def _read_scores(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    table = pq.read_table(path)
    return {row["doc_id"]: row for row in table.to_pylist()}


def _write_scores(path: Path, scores: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(list(scores.values())), tmp)
    tmp.replace(path)


def llm_scores(ds: Dataset, rows: np.ndarray, cfg) -> pa.Table:
    """Real ``Scorer`` output for the given rows; each document is scored once and cached on disk."""
    path = _score_cache_path(ds, cfg)
    scores = _read_scores(path)
    todo = [int(r) for r in rows if ds.ids[r] not in scores]
    if todo:
        _score_missing(ds, todo, cfg, scores, path)
    return pa.Table.from_pylist([scores[ds.ids[r]] for r in rows])


def _score_missing(ds: Dataset, todo: list[int], cfg, scores: dict[str, dict], path: Path) -> None:
    from labelnext.ops.score.scorer import Scorer

    log(f"{ds.name}: scoring {len(todo)} docs with {cfg.model} ({cfg.backend}); cache {path.name}")
    scorer = Scorer(cfg, device="auto", num_cpus=os.cpu_count() or 1)
    todo.sort(key=lambda r: len(str(ds.texts[r])))  # similar lengths batch with less padding
    start, done, last_flush = time.perf_counter(), 0, time.perf_counter()
    for i in range(0, len(todo), SCORE_CHUNK):
        chunk = todo[i: i + SCORE_CHUNK]
        batch = {"doc_id": np.array([ds.ids[r] for r in chunk], dtype=object),
                 "text": np.array([str(ds.texts[r]) for r in chunk], dtype=object)}
        out = scorer(batch)
        for j, r in enumerate(chunk):
            scores[ds.ids[r]] = {"doc_id": ds.ids[r], **{c: _py(out[c][j]) for c in SCORE_COLUMNS}}
        done += len(chunk)
        if time.perf_counter() - last_flush > 60 or done == len(todo):
            _write_scores(path, scores)
            last_flush = time.perf_counter()
            rate = done / (time.perf_counter() - start)
            log(f"{ds.name}: scored {done}/{len(todo)} ({rate:.1f} docs/s)")


def _py(value):
    return value.item() if isinstance(value, np.generic) else value

