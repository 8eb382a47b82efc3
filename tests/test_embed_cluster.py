"""Embed and cluster stages with the real default encoder and real FAISS."""

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pytest

from labelnext.ops.cluster.kmeans import Assigner, choose_k, train_kmeans
from labelnext.ops.embed.encoder import (CPU_BATCH_TOKENS, GPU_BATCH_TOKENS, Embedder, batch_tokens_for, ray_batch_docs,
                                  resolve_embed_dtype, token_budget_batches)
from labelnext.pipelines.config import ClusterConfig, EmbedConfig
from labelnext.pipelines.sample_corpus import make_documents


@pytest.fixture(scope="module")
def embedder():
    return Embedder(EmbedConfig(), device="cpu")


def test_real_encoder_gives_normalised_semantic_vectors(embedder):
    texts = ["The striker scored a late goal in the final.", "The goalkeeper saved a penalty in the cup match.",
             "The central bank raised interest rates again."]
    out = embedder({"doc_id": np.array(["a", "b", "c"]), "text": np.array(texts, dtype=object)})
    emb = out["embedding"]
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]
    # Batch composition does not change a document's vector.
    np.testing.assert_allclose(embedder.encode([texts[2]])[0], emb[2], atol=1e-5)


LONG = " ".join(["The committee debated the budget line by line late into the night."] * 30)
MIXED = ["Rates rose.", LONG, "A goal in the final minute.", LONG + " Again.", "Rates rose. Twice.",
         "  Leading and trailing spaces  ", "UPPER case Words", "Ünïcödé naïve café – emoji 🎉"]


def _plain(embedder, texts):
    """Today's float32 path: sentence-transformers' own encode."""
    return np.ascontiguousarray(embedder.model.encode(texts, batch_size=32, normalize_embeddings=True,
                                                      show_progress_bar=False), dtype=np.float32)


def test_token_budget_batches_cover_every_row_within_budget():
    lengths = np.array([3, 256, 17, 256, 9, 120, 1, 64])
    batches = token_budget_batches(lengths, batch_tokens=512, max_rows=3, multiple=8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:
        width = -(-int(lengths[b].max()) // 8) * 8
        assert len(b) <= 3 and (len(b) == 1 or len(b) * width <= 512)
        assert int(lengths[b[0]]) == int(lengths[b].max())  # longest first: the first row sets the width
    assert [len(b) for b in token_budget_batches(np.array([600, 5]), 512, 64)] == [1, 1]


def test_text_and_token_id_paths_match_plain_encode(embedder):
    plain = _plain(embedder, MIXED)
    from_text = embedder.encode(MIXED)
    from_ids = embedder.encode_ids(embedder.tokenizer(MIXED))
    np.testing.assert_array_equal(from_text, from_ids)
    assert np.min(np.sum(from_text * plain, axis=1)) >= 0.9999
    np.testing.assert_allclose(from_text, plain, atol=1e-5)


def test_gpu_batching_on_cpu_gives_the_same_vectors(embedder):
    """The GPU layout (one 65,536-token budget, widths padded to a multiple of 8) run on CPU in float32."""
    plain = embedder.encode(MIXED)
    knobs = (embedder.batch_tokens, embedder.max_rows, embedder.pad_multiple)
    embedder.batch_tokens, embedder.max_rows, embedder.pad_multiple = GPU_BATCH_TOKENS, GPU_BATCH_TOKENS // 8, 8
    try:
        np.testing.assert_allclose(embedder.encode(MIXED), plain, atol=1e-5)
    finally:
        embedder.batch_tokens, embedder.max_rows, embedder.pad_multiple = knobs


def test_token_ids_column_is_used_and_dropped(embedder):
    ids = embedder.tokenizer(MIXED[:3])
    out = embedder({"doc_id": np.array(["a", "b", "c"]), "text": np.array(["x", "y", "z"], dtype=object),
                    "_token_ids": np.array(ids, dtype=object)})
    assert "_token_ids" not in out
    np.testing.assert_allclose(out["embedding"], embedder.encode(MIXED[:3]), atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_body_stays_within_the_cosine_bound(dtype):
    """The GPU default is float16; measured here on CPU (same weights and rounding of the body)."""
    texts = MIXED + make_documents(60, seed=2).column("text").to_pylist()
    texts = [t for t in texts if t and t.strip()]
    reference = Embedder(EmbedConfig(dtype="float32"), device="cpu").encode(texts)
    half = Embedder(EmbedConfig(dtype=dtype), device="cpu").encode(texts)
    assert half.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(half * reference, axis=1)) >= 0.999


def test_device_defaults():
    import torch

    assert resolve_embed_dtype("auto", "cpu") == torch.float32
    assert resolve_embed_dtype("auto", "cuda") == torch.float16
    assert batch_tokens_for(EmbedConfig(), "cpu") == CPU_BATCH_TOKENS
    assert batch_tokens_for(EmbedConfig(), "cuda") == GPU_BATCH_TOKENS
    assert ray_batch_docs(EmbedConfig(), use_gpu=False) == 4 * EmbedConfig().batch_size
    assert ray_batch_docs(EmbedConfig(), use_gpu=True) == 4 * GPU_BATCH_TOKENS // 128


def test_kmeans_on_real_embeddings_recovers_topics(embedder):
    table = make_documents(240, seed=1)
    table = table.filter(pa.compute.not_equal(table.column("topic"), "bad"))
    texts = table.column("text").to_pylist()
    topics = np.array(table.column("topic").to_pylist())
    emb = embedder.encode(texts)
    cfg = ClusterConfig(k=6, niter=25, seed=0)
    centroids, objective = train_kmeans(emb, 6, cfg, use_gpu=False)
    assert centroids.shape == (6, 384) and np.isfinite(objective)
    out = Assigner(centroids)({"doc_id": np.array([str(i) for i in range(len(texts))]), "embedding": emb})
    clusters = out["cluster_id"]
    assert clusters.min() >= 0 and clusters.max() < 6
    assert (out["distance"] >= 0).all()
    # Purity: most documents share a cluster with their topic's majority.
    purity = sum(np.bincount(clusters[topics == t]).max() for t in set(topics)) / len(texts)
    assert purity > 0.8


def test_choose_k_is_bounded():
    assert choose_k(2500, 40, ClusterConfig()) == 40  # one cluster per label by default
    assert choose_k(2500, 40, ClusterConfig(labels_per_cluster=2)) == 20
    assert choose_k(10, 40, ClusterConfig()) == 2
    assert choose_k(5, 40, ClusterConfig(k=64)) == 5
    with pytest.raises(ValueError, match="larger than"):
        train_kmeans(np.zeros((3, 4), np.float32), 5, ClusterConfig(), use_gpu=False)


def test_kmeans_plus_plus_seeding_gives_small_modes_their_own_centroid():
    """One large mode and three small far ones, k = 4: k-means++ (cluster.init) seeds every small mode in every
    seed tried; faiss's random seeding (training points drawn uniformly) merges or splits them in some."""
    rng = np.random.default_rng(0)
    dim, small = 32, 20

    def blob(axis: int, n: int) -> np.ndarray:
        x = np.eye(dim)[axis] + 0.005 * rng.standard_normal((n, dim))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    x = np.vstack([blob(0, 2000)] + [blob(a, small) for a in (1, 2, 3)]).astype(np.float32)
    mode = np.repeat([0, 1, 2, 3], [2000, small, small, small])
    order = rng.permutation(len(x))
    x, mode = x[order], mode[order]

    def small_modes_alone(init: str, seed: int) -> int:
        centroids, _ = train_kmeans(x, 4, ClusterConfig(init=init, seed=seed), use_gpu=False)
        cluster = np.argmax(x @ centroids.T, axis=1)
        return sum(len(set(cluster[mode == m])) == 1 and set(cluster[mode == m]).isdisjoint(cluster[mode != m])
                   for m in (1, 2, 3))

    assert [small_modes_alone("kmeans++", s) for s in range(8)] == [3] * 8
    assert min(small_modes_alone("random", s) for s in range(8)) < 3
    first, _ = train_kmeans(x, 4, ClusterConfig(init="kmeans++", seed=3), use_gpu=False)
    again, _ = train_kmeans(x, 4, ClusterConfig(init="kmeans++", seed=3), use_gpu=False)
    np.testing.assert_array_equal(first, again)  # seeded: a rerun trains the same centroids


def test_auto_seeding_is_random_below_kmeanspp_min_k_and_kmeans_plus_plus_from_it():
    """cluster.init auto (the default) trains exactly what random seeding trains below kmeanspp_min_k clusters and
    what k-means++ trains from there."""
    from labelnext.ops.cluster.kmeans import seeding

    cfg = ClusterConfig(kmeanspp_min_k=6)
    assert cfg.init == "auto"
    assert [seeding(k, cfg) for k in (1, 5, 6, 4096)] == ["random", "random", "kmeans++", "kmeans++"]
    assert seeding(4096, ClusterConfig(init="random")) == "random"
    assert seeding(2, ClusterConfig(init="kmeans++")) == "kmeans++"
    rng = np.random.default_rng(1)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for k, same_as in ((5, "random"), (6, "kmeans++")):
        auto, _ = train_kmeans(x, k, cfg, use_gpu=False)
        fixed, _ = train_kmeans(x, k, cfg.model_copy(update={"init": same_as}), use_gpu=False)
        other, _ = train_kmeans(x, k, cfg.model_copy(update={"init": ({"random", "kmeans++"} - {same_as}).pop()}),
                                use_gpu=False)
        np.testing.assert_array_equal(auto, fixed)
        assert not np.array_equal(auto, other)
