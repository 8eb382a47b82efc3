"""The embedding cache on local Ray: a key cached by several files comes back once, whatever the batches."""

from __future__ import annotations

import numpy as np

from labelnext.ops.io import storage
from labelnext.ops.core.columns import DOC_ID, EMBEDDING, TEXT, TEXT_HASH
from labelnext.ops.embed.encoder import EmbedConfig
from labelnext.ops.embed.cache import EmbeddingCache
from labelnext.ops.core.instrument import ACTOR_ID, BUSY_S, NODE_ID
from labelnext.pipelines.config import StorageConfig


def _batch(ids: list[str], hashes: list[str], run: int = 0) -> dict[str, np.ndarray]:
    # The run's number in the vector tells which file a copy was read from.
    vectors = np.array([[float(i[1:]), float(h[1:]), run] for i, h in zip(ids, hashes)], dtype=np.float32)
    return {DOC_ID: np.array(ids, dtype=object), TEXT: np.array(ids, dtype=object),
            TEXT_HASH: np.array(hashes, dtype=object), EMBEDDING: vectors}


def test_keys_cached_by_several_files_are_joined_once(ray_local, tmp_path):
    cache = EmbeddingCache(storage.OutputRoot.open(str(tmp_path), StorageConfig()), EmbedConfig())
    # Three runs batched the same documents differently; d2 changed its text (h9) after the first.
    cache.write(_batch(["d1", "d2", "d3"], ["h1", "h2", "h3"], run=1))
    cache.write(_batch(["d1", "d3"], ["h1", "h3"], run=2))
    cache.write(_batch(["d3", "d2", "d4"], ["h3", "h9", "h4"], run=3))
    files = sorted(cache.files())
    assert len(files) == 3

    docs = ray_local.data.from_items([{DOC_ID: d, TEXT: d, TEXT_HASH: h}
                                      for d, h in [("d1", "h1"), ("d2", "h9"), ("d3", "h3"), ("d5", "h5")]])
    todo, hits = cache.split(docs, [DOC_ID, TEXT], n_docs=4)
    assert sorted(todo.to_pandas()[DOC_ID]) == ["d5"]
    got = hits.to_pandas()
    assert sorted(got[DOC_ID]) == ["d1", "d2", "d3"]
    assert set(got.columns) == {DOC_ID, TEXT, EMBEDDING, NODE_ID, ACTOR_ID, BUSY_S}
    vectors = {d: list(v) for d, v in zip(got[DOC_ID], got[EMBEDDING])}
    assert vectors["d2"] == [2.0, 9.0, 3.0]  # the vector of the current text
    for doc in ("d1", "d3"):  # the copy of the first file (by path) that holds the key
        first = min(p for p in files if doc in _ids(p))
        assert vectors[doc][2] == _run_of(first)


def test_the_cached_half_comes_without_a_shuffle_through_actors(ray_local, tmp_path):
    """Ray Data's join and groupby start aggregator actors per call (seconds each): reading cached vectors
    then costs more than embedding a few thousand documents afresh. The lookup is plain tasks."""
    cache = EmbeddingCache(storage.OutputRoot.open(str(tmp_path), StorageConfig()), EmbedConfig())
    ids = [f"d{i}" for i in range(1, 301)]
    cache.write(_batch(ids[:200], [f"h{i}" for i in range(1, 201)], run=1))
    cache.write(_batch(ids[100:], [f"h{i}" for i in range(101, 301)], run=2))
    docs = ray_local.data.from_items([{DOC_ID: d, TEXT: d, TEXT_HASH: f"h{d[1:]}"} for d in ids], override_num_blocks=4)
    todo, hits = cache.split(docs, [DOC_ID, TEXT], n_docs=300_000)  # several partitions
    assert todo.count() == 0 and hits.count() == 300
    got = hits.to_pandas()
    assert sorted(got[DOC_ID]) == sorted(ids)
    assert np.stack(got[EMBEDDING].to_list()).shape == (300, 3)
    for ds in (todo, hits):
        stats = ds.stats()
        assert not any(op in stats for op in ("Join", "HashShuffle", "Aggregate", "HashAggregate")), stats


def _run_of(path: str) -> float:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[EMBEDDING]).column(EMBEDDING)[0].values[2].as_py()


def _ids(path: str) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_table(path, columns=[DOC_ID]).column(DOC_ID).to_pylist())
