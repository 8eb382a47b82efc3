"""The embedding cache on local Ray: a key cached by several files comes back once, whatever the batches."""

from __future__ import annotations

import numpy as np

from labelnext.ops.io import storage
from labelnext.ops.core.columns import DOC_ID, EMBEDDING, TEXT, TEXT_HASH
from labelnext.ops.embed.encoder import EmbedConfig
from labelnext.ops.embed.cache import EmbeddingCache
from labelnext.ops.core.instrument import ACTOR_ID, BUSY_S, NODE_ID
from labelnext.pipelines.config import StorageConfig


def _batch(ids: list[str], hashes: list[str]) -> dict[str, np.ndarray]:
    vectors = np.array([[float(i[1:]), float(h[1:])] for i, h in zip(ids, hashes)], dtype=np.float32)
    return {DOC_ID: np.array(ids, dtype=object), TEXT: np.array(ids, dtype=object),
            TEXT_HASH: np.array(hashes, dtype=object), EMBEDDING: vectors}


def test_keys_cached_by_several_files_are_joined_once(ray_local, tmp_path):
    cache = EmbeddingCache(storage.OutputRoot.open(str(tmp_path), StorageConfig()), EmbedConfig())
    # Three runs batched the same documents differently; d2 changed its text (h9) after the first.
    cache.write(_batch(["d1", "d2", "d3"], ["h1", "h2", "h3"]))
    cache.write(_batch(["d1", "d3"], ["h1", "h3"]))
    cache.write(_batch(["d3", "d2", "d4"], ["h3", "h9", "h4"]))
    files = sorted(cache.files())
    assert len(files) == 3
    kept = cache.kept_copies(files).sort_by(DOC_ID).to_pylist()
    assert [(r[DOC_ID], r["text_hash"]) for r in kept] == [("d1", "h1"), ("d3", "h3")]
    for row in kept:  # the first file (by path) that holds the key
        assert row["path"].endswith(min(p for p in files if row[DOC_ID] in _ids(p)).split("/")[-1])

    docs = ray_local.data.from_items([{DOC_ID: d, TEXT: d, TEXT_HASH: h}
                                      for d, h in [("d1", "h1"), ("d2", "h9"), ("d3", "h3"), ("d5", "h5")]])
    todo, hits = cache.split(docs, [DOC_ID, TEXT], n_docs=4)
    assert sorted(todo.to_pandas()[DOC_ID]) == ["d5"]
    got = hits.to_pandas()
    assert sorted(got[DOC_ID]) == ["d1", "d2", "d3"]
    assert set(got.columns) == {DOC_ID, TEXT, EMBEDDING, NODE_ID, ACTOR_ID, BUSY_S}
    vectors = {d: list(v) for d, v in zip(got[DOC_ID], got[EMBEDDING])}
    assert vectors["d2"] == [2.0, 9.0]  # the vector of the current text


def _ids(path: str) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_table(path, columns=[DOC_ID]).column(DOC_ID).to_pylist())
