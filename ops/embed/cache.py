"""Embedding cache: vectors keyed by (doc_id, text hash, model) so a later run embeds only new or changed docs.

Layout: ``OUTPUT/cache/embeddings/model=<slug>/part-<digest>.parquet`` with ``doc_id``, ``text_hash`` and
``embedding`` (fixed-size list of float32). Entries are content-addressed, so files written by a run that
later crashed are still valid and a rerun reuses them. Each file is named after the keys it holds, so a
retried Ray task rewrites the same file instead of adding a copy.

Lookup is a Ray Data left outer join of the accepted documents with the cache on (doc_id, text_hash): it
runs distributed and the driver holds no keys. A key cached twice (two runs, or a crashed run's retry that
batched differently, embedded the same document) is joined from one file only, the first by path, so a
document never comes back twice. Without any cache file the join is skipped. The join reads
and shuffles the whole cache (about 1.5 KB per cached document at 384 dimensions); the cache grows by the
files of each run and is never compacted, so delete it (or a model's folder) to start over.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Optional

import numpy as np
import pyarrow as pa

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
        and busy time.
        """
        import ray
        from ray.data.expressions import col

        files = self.files()
        if not files:
            return docs, None
        cached = ray.data.read_parquet(
            files, filesystem=self.fs, columns=["doc_id", "text_hash", EMBEDDING], partitioning=None,
            include_paths=True)
        partitions = max(1, min(256, math.ceil(n_docs / _ROWS_PER_JOIN_PARTITION)))
        kept = self.kept_copies(files, partitions)
        if kept is not None:
            cached = cached.map_batches(_drop_other_copies, fn_kwargs={"kept": ray.put(kept)}, batch_format="pyarrow")
        cached = cached.drop_columns(["path"]).rename_columns({"text_hash": TEXT_HASH})
        joined = docs.join(cached, "left_outer", partitions, on=("doc_id", TEXT_HASH)).materialize()
        misses = joined.filter(expr=col(EMBEDDING).is_null()).drop_columns([EMBEDDING])
        hits = joined.filter(expr=~col(EMBEDDING).is_null()).map_batches(
            _as_embedded, fn_kwargs={"columns": columns}, batch_format="numpy")
        return misses.materialize(), hits.materialize()

    def kept_copies(self, files: list[str], partitions: int = 1) -> Optional[pa.Table]:
        """(doc_id, text_hash, path): for each key that several cache files hold, the file whose copy is used.

        None when every key is cached once (the usual case): a slim groupby over the keys finds out, and only
        the repeated keys reach the driver.
        """
        import ray
        from ray.data.expressions import col

        keys = ray.data.read_parquet(files, filesystem=self.fs, columns=["doc_id", "text_hash"], partitioning=None,
                                     include_paths=True)
        counts = keys.select_columns(["doc_id", "text_hash"]).groupby(["doc_id", "text_hash"],
                                                                       num_partitions=partitions).count()
        repeated = _gather(counts.filter(expr=col("count()") > 1).select_columns(["doc_id", "text_hash"]))
        if repeated.num_rows == 0:
            return None
        located = _gather(keys.map_batches(_rows_with_keys, fn_kwargs={"keys": ray.put(_key(repeated))},
                                           batch_format="pyarrow"))
        first = located.group_by(["doc_id", "text_hash"]).aggregate([("path", "min")])
        return first.select(["doc_id", "text_hash", "path_min"]).rename_columns(["doc_id", "text_hash", "path"])

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


def _gather(ds) -> pa.Table:
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({"doc_id": pa.array([], pa.string())})


def _key(table: pa.Table) -> pa.Array:
    return pa.compute.binary_join_element_wise(table.column("doc_id"), table.column("text_hash"), "\x1f")


def _rows_with_keys(table: pa.Table, keys) -> pa.Table:
    if not isinstance(keys, pa.Array):
        import ray

        keys = ray.get(keys)
    return table.filter(pa.compute.is_in(_key(table), value_set=keys))


def _drop_other_copies(table: pa.Table, kept) -> pa.Table:
    """Cache rows, less the copies of repeated keys that ``kept`` does not name."""
    if not isinstance(kept, pa.Table):
        import ray

        kept = ray.get(kept)
    where = pa.compute.index_in(_key(table), value_set=_key(kept))
    kept_path = kept.column("path").take(where)
    other = pa.compute.fill_null(pa.compute.not_equal(table.column("path"), kept_path), False)
    return table.filter(pa.compute.invert(other))


def _as_embedded(batch: dict[str, np.ndarray], columns: list[str]) -> dict[str, np.ndarray]:
    """Cached rows in the encoder's output shape."""
    import ray

    vectors = batch[EMBEDDING]
    if vectors.dtype == object:
        vectors = np.stack(vectors) if len(vectors) else np.zeros((0, 1), np.float32)
    n = len(batch["doc_id"])
    out = {name: batch[name] for name in columns}
    out[EMBEDDING] = np.ascontiguousarray(vectors, dtype=np.float32)
    out[NODE_ID] = np.full(n, ray.get_runtime_context().get_node_id(), dtype=object)
    out[ACTOR_ID] = np.full(n, "", dtype=object)  # read from the cache: no encoder actor
    out[BUSY_S] = np.zeros(n, dtype=np.float64)
    return out
