"""The embed stage's actor pool: token ids from CPU tasks, then the encoder on a pool of actors."""

from __future__ import annotations

from typing import Optional

from ray.data import ActorPoolStrategy

from labelnext.ops.core.columns import DOC_ID, EMBEDDING
from labelnext.ops.core.instrument import instrumented
from labelnext.ops.embed import encoder as emb
from labelnext.ops.embed.cache import EmbeddingCache
from labelnext.ops.embed.settings import EmbedConfig
from labelnext.pipelines import dataflow as flow
from labelnext.pipelines.placement import StagePlacement


def embed_pool(todo, cfg: EmbedConfig, p: StagePlacement, cache: Optional[EmbeddingCache]):
    """``todo`` (doc_id, text[, text_hash]) embedded, lazily; written to ``cache`` as it goes when there is one."""
    from labelnext.ops.embed.tokenize import tokenize_dataset

    batch_size = emb.ray_batch_docs(cfg, p.use_gpu)
    # Token ids come from CPU tasks, so GPU actors only run the encoder.
    embedded = tokenize_dataset(todo, cfg, batch_size=batch_size).map_batches(
        instrumented(emb.Embedder),
        fn_constructor_kwargs={"cfg": cfg, "device": "cuda" if p.use_gpu else "cpu"},
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=p.concurrency),
        num_cpus=p.num_cpus,
        num_gpus=p.num_gpus if p.use_gpu else 0,
        batch_format="numpy",
    )
    if cache is not None:
        embedded = embedded.map_batches(cache.write, batch_format="numpy")
    return embedded


def given_vectors(accepted):
    """``input.embedding_column``: the corpus's own vectors (validated and normalised by the reader), materialised."""
    return accepted.select_columns([DOC_ID, EMBEDDING]).map_batches(flow.as_embedded, batch_format="numpy").materialize()
