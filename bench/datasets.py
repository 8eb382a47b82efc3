"""The labelled datasets of the quality bench: every Parquet file in ``../shared/data/``, split into a pool and a
held-out test set (stratified, fixed seed), and the embeddings of every row with the product's ``Embedder``,
cached by the file's hash and the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from bench.common import OUT, SHARED_DATA, cache_key, file_sha256, log, save_array, slug

SPLIT_SEED = 0
TEST_FRACTION = 0.3
CACHE = OUT / "cache"


@dataclass
class Dataset:
    name: str
    path: Path
    sha256: str
    ids: np.ndarray
    texts: np.ndarray
    labels: np.ndarray
    pool: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # row positions in the file
    test: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


def discover(names: Optional[list[str]]) -> list[Path]:
    files = sorted(SHARED_DATA.glob("*.parquet"))
    if names:
        files = [f for f in files if f.stem in names]
    return files


def load_dataset(path: Path) -> Dataset:
    table = pq.read_table(path, columns=["id", "text", "label"])
    return Dataset(
        name=path.stem,
        path=path,
        sha256=file_sha256(path),
        ids=np.array(table.column("id").to_pylist(), dtype=object),
        texts=np.array(table.column("text").to_pylist(), dtype=object),
        labels=np.array(table.column("label").to_pylist(), dtype=object),
    )


def split(ds: Dataset, pool_cap: Optional[int], test_cap: Optional[int]) -> Dataset:
    """Stratified pool/test split with a fixed seed; optional stratified caps for quick runs."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(ds.ids))
    pool, test = train_test_split(rows, test_size=TEST_FRACTION, stratify=ds.labels, random_state=SPLIT_SEED)
    ds.pool = np.sort(_stratified_cap(pool, ds.labels, pool_cap))
    ds.test = np.sort(_stratified_cap(test, ds.labels, test_cap))
    return ds


def _stratified_cap(rows: np.ndarray, labels: np.ndarray, cap: Optional[int]) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    if cap is None or cap >= len(rows):
        return rows
    keep, _ = train_test_split(rows, train_size=cap, stratify=labels[rows], random_state=SPLIT_SEED)
    return keep


# -- cached embeddings and LLM scores ---------------------------------------------------------------------
def embeddings(ds: Dataset, cfg) -> np.ndarray:
    """Embeddings of every row of the file (real ``Embedder``), cached by file hash + model."""
    from labelnext.ops.embed.encoder import Embedder

    path = CACHE / f"emb-{slug(ds.name)}-{cache_key(ds.sha256, cfg.model, cfg.max_seq_length)}.npy"
    if path.is_file():
        return np.load(path)
    log(f"{ds.name}: embedding {len(ds.texts)} docs with {cfg.model}")
    emb = Embedder(cfg, device="cuda" if _has_cuda() else "cpu").encode([str(t) for t in ds.texts])
    save_array(path, emb)
    return emb



def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
