"""Embedding cache: vectors keyed by (doc_id, text hash, model) so a later run embeds only new or changed docs.

Layout: ``OUTPUT/cache/embeddings/model=<slug>/part-<digest>.parquet`` with ``doc_id``, ``text_hash`` and
``embedding`` (fixed-size list of float32). Entries are content-addressed, so files written by a run that
later crashed are still valid and a rerun reuses them. Each file is named after the keys it holds, so a
retried Ray task rewrites the same file instead of adding a copy.

Lookup is a left outer join of the accepted documents with the cache on (doc_id, text_hash), as a hash
shuffle over plain Ray tasks: each block of documents and of cache rows is split by doc_id hash, and one
task per partition joins its parts, so the driver holds object refs and no keys. No actor pool starts (Ray
Data's join and groupby start a pool of aggregator actors per call: seconds of fixed cost, more than
embedding a few thousand short documents afresh). A key cached twice (two runs, or a crashed run's retry
that batched differently, embedded the same document) is joined from one file only, the first by path, so
a document never comes back twice. Without any cache file the join is skipped. The join reads and shuffles
the whole cache (about 1.5 KB per cached document at 384 dimensions); the cache grows by the files of each
run and is never compacted, so delete it (or a model's folder) to start over.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from labelnext.ops.io import read as rd
from labelnext.ops.io import storage
from labelnext.ops.core.columns import EMBEDDING, TEXT_HASH
from labelnext.ops.embed.settings import EmbedConfig
from labelnext.ops.core.instrument import ACTOR_ID, BUSY_S, NODE_ID
from labelnext.ops.io.storage import OutputRoot

# TEXT_HASH is the pipeline's column; the cache files call it text_hash.
CACHE_DIR = "cache/embeddings"
_ROWS_PER_JOIN_PARTITION = 100_000


def model_key(cfg: EmbedConfig) -> str:
    """The encoder and the settings that change its vectors: truncation length, and the body's dtype when one is
    forced (``auto`` resolves per device, the same on every night of one cluster, and keeps the older key)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.model).strip("-") or "model"
    dtype = "" if cfg.dtype == "auto" else f"-{cfg.dtype}"
    return f"{slug}-seq{cfg.max_seq_length}{dtype}"


def add_text_hash(table: pa.Table) -> pa.Table:
    """Ray Data batch function: hash of the (already truncated) text that the encoder sees."""
    return table.append_column(TEXT_HASH, pa.array(rd.text_hash(table.column("text").to_pylist()), pa.string()))


class EmbeddingCache:
    """One encoder's cache under an output root: split documents into cached/new, store new vectors."""

    def __init__(self, output: OutputRoot, cfg: EmbedConfig):
        self.fs = output.fs
        self.dir = output.path(f"{CACHE_DIR}/model={model_key(cfg)}")

    def files(self) -> list[str]:
        return [p for p in storage.list_files(self.fs, self.dir) if p.endswith(".parquet")]

    def split(self, docs: Any, columns: list[str], n_docs: int) -> tuple[Any, Optional[Any]]:
        """(documents to embed, documents with cached vectors) from a dataset of ``columns`` + ``_text_hash``.

        The cached half has the embed stage's output columns: ``columns``, ``embedding`` as a tensor, node
        and busy time. Both halves come back materialised.
        """
        import ray

        files = self.files()
        if not files:
            return docs, None
        parts = max(1, min(256, math.ceil(n_docs / _ROWS_PER_JOIN_PARTITION)))
        cached = ray.data.read_parquet(
            files, filesystem=self.fs, columns=["doc_id", "text_hash", EMBEDDING], partitioning=None,
            include_paths=True)
        dim = pq.read_schema(files[0], filesystem=self.fs).field(EMBEDDING).type.list_size
        split = ray.remote(_hash_split).options(num_returns=parts)
        doc_parts = [split.remote(ref, parts) for ref in docs.to_arrow_refs()]
        if not doc_parts:
            return docs, None
        cache_parts = [split.remote(ref, parts) for ref in cached.to_arrow_refs()]
        if parts == 1:
            doc_parts, cache_parts = [[p] for p in doc_parts], [[p] for p in cache_parts]
        join = ray.remote(_join_partition).options(num_returns=2)
        joined = [join.remote(len(doc_parts), dim, *[p[i] for p in doc_parts], *[p[i] for p in cache_parts])
                  for i in range(parts)]
        misses = ray.data.from_arrow_refs([m for m, _ in joined])
        hits = ray.data.from_arrow_refs([h for _, h in joined]).map_batches(
            _as_embedded, fn_kwargs={"columns": columns}, batch_format="pyarrow")
        return misses.materialize(), hits.materialize()

    def write(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data batch function after the encoder: store the new vectors, pass the batch on."""
        hashes = batch.pop(TEXT_HASH)
        if len(hashes) == 0:
            return batch
        vectors = np.ascontiguousarray(batch[EMBEDDING], dtype=np.float32)
        ids = [str(d) for d in batch["doc_id"]]
        table = pa.table({
            "doc_id": pa.array(ids, pa.string()),
            "text_hash": pa.array([str(h) for h in hashes], pa.string()),
            EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
        })
        digest = hashlib.blake2b("\n".join(f"{i}\t{h}" for i, h in zip(ids, hashes)).encode("utf-8"),
                                 digest_size=16).hexdigest()
        storage.write_parquet(self.fs, f"{self.dir}/part-{digest}.parquet", table)
        return batch


def _key(table: pa.Table, hash_column: str) -> pa.Array:
    return pa.compute.binary_join_element_wise(table.column("doc_id"), table.column(hash_column), "\x1f")


def _hash_split(table: pa.Table, parts: int):
    """A block split by doc_id hash, so a document and every cached copy of it land in the same part."""
    if parts == 1:
        return table
    import pandas as pd

    part = pd.util.hash_array(table.column("doc_id").to_numpy(zero_copy_only=False)) % np.uint64(parts)
    return tuple(table.filter(pa.array(part == p)) for p in range(parts))


def _join_partition(n_doc_parts: int, dim: int, *parts: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(misses, hits) of one hash partition: the documents without a cached vector, and those with one.

    A key cached by several files takes the copy of the first file by path: ``index_in`` answers the first
    match, and the cache rows are sorted by path first.
    """
    docs = pa.concat_tables(parts[:n_doc_parts])
    cached = [p for p in parts[n_doc_parts:] if p.num_rows]
    cache = pa.concat_tables(cached).sort_by("path") if cached else _empty_cache(dim)
    where = pa.compute.index_in(_key(docs, TEXT_HASH), value_set=_key(cache, "text_hash"))
    found = pa.compute.is_valid(where)
    hits = docs.filter(found).append_column(EMBEDDING, cache.column(EMBEDDING).take(where.filter(found)))
    return docs.filter(pa.compute.invert(found)), hits


def _empty_cache(dim: int) -> pa.Table:
    return pa.table({"doc_id": pa.array([], pa.string()), "text_hash": pa.array([], pa.string()),
                     EMBEDDING: pa.array([], pa.list_(pa.float32(), dim)), "path": pa.array([], pa.string())})


def _as_embedded(batch: pa.Table, columns: list[str]) -> dict[str, np.ndarray]:
    """Cached rows in the encoder's output shape: the vectors as one (rows, dim) array, no per-row work."""
    import ray

    n = batch.num_rows
    vectors = batch.column(EMBEDDING).combine_chunks()
    out = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in columns}
    out[EMBEDDING] = np.ascontiguousarray(
        vectors.flatten().to_numpy(zero_copy_only=False).reshape(n, vectors.type.list_size), dtype=np.float32)
    out[NODE_ID] = np.full(n, ray.get_runtime_context().get_node_id(), dtype=object)
    out[ACTOR_ID] = np.full(n, "", dtype=object)  # read from the cache: no encoder actor
    out[BUSY_S] = np.zeros(n, dtype=np.float64)
    return out
