"""The LLM scores of pool documents for the quality bench: the real ``Scorer``, every document scored once and
cached on disk by the data file, the model, its window and (with ``score.task`` set) the task prompt.

Plain text: ``uncertainty`` (mean token entropy), ``max_entropy``, ``nll``, ``n_tokens``, ``truncated``. With a
task prompt and choices, ``uncertainty`` is the entropy over the calibrated choice probabilities and the columns
``llm_label``, ``llm_margin``, ``llm_probs`` come with it; the content-free calibration vector is kept beside the
cache (``calibration``), so the uncalibrated (zero-shot) prediction can be recovered from the calibrated one."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import cache_key, log, save_array, slug
from bench.datasets import CACHE, Dataset

SCORE_CHUNK = 64
TASK_CHUNK = 16  # a task prompt costs several plain passes per document (its choices): flush progress sooner


def _score_cache_path(ds: Dataset, cfg) -> Path:
    # The task prompt joins the key only when set, so the plain-text caches keep their names.
    task = (cfg.task.model_dump_json(),) if cfg.prompted else ()
    key = cache_key(ds.sha256, cfg.model, cfg.max_tokens, cfg.truncation, cfg.dtype, *task)
    return CACHE / f"scores-{slug(ds.name)}-{key}.parquet"


def _calibration_path(ds: Dataset, cfg) -> Path:
    return _score_cache_path(ds, cfg).with_suffix(".calibration.npy")


def columns(cfg) -> tuple[str, ...]:
    """The Scorer's per-document columns under ``cfg`` (the choice columns with a task prompt and choices)."""
    from labelnext.ops.score.scorer import score_columns

    return score_columns(cfg)


def calibration(ds: Dataset, cfg) -> Optional[np.ndarray]:
    """The content-free choice distribution the scores were calibrated with (None without calibration)."""
    path = _calibration_path(ds, cfg)
    return np.load(path) if path.is_file() else None


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
    names = columns(cfg)
    if cfg.prompted and cfg.task.choices and cfg.task.calibrate:
        save_array(_calibration_path(ds, cfg), scorer.calibration())
    todo.sort(key=lambda r: len(str(ds.texts[r])))  # similar lengths batch with less padding
    start, done, last_flush = time.perf_counter(), 0, time.perf_counter()
    step = TASK_CHUNK if cfg.prompted else SCORE_CHUNK
    for i in range(0, len(todo), step):
        chunk = todo[i: i + step]
        batch = {"doc_id": np.array([ds.ids[r] for r in chunk], dtype=object),
                 "text": np.array([str(ds.texts[r]) for r in chunk], dtype=object)}
        out = scorer.score_texts(batch["text"].tolist()) if cfg.prompted else scorer(batch)
        for j, r in enumerate(chunk):
            scores[ds.ids[r]] = {"doc_id": ds.ids[r], **{c: _py(out[c][j]) for c in names}}
        done += len(chunk)
        if time.perf_counter() - last_flush > 60 or done == len(todo):
            _write_scores(path, scores)
            last_flush = time.perf_counter()
            rate = done / (time.perf_counter() - start)
            log(f"{ds.name}: scored {done}/{len(todo)} ({rate:.1f} docs/s)")


def _py(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value

