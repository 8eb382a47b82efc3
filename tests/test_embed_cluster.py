"""Embed and cluster stages with the real default encoder and real FAISS."""

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pytest

from labelnext.ops.cluster import Assigner, choose_k, train_kmeans
from labelnext.ops.embed import Embedder
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


def test_token_bounded_batches_keep_order_and_match_plain_encode(embedder):
    short = "Rates rose."
    long = " ".join(["The committee debated the budget line by line late into the night."] * 30)
    texts = [short, long, "A goal in the final minute.", long + " Again.", short + " Twice."]
    batches = embedder._token_batches(texts)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(texts)))
    assert all(len(b) <= embedder.cfg.batch_size for b in batches)
    plain = np.ascontiguousarray(embedder.model.encode(texts, batch_size=len(texts), normalize_embeddings=True,
                                                       show_progress_bar=False), dtype=np.float32)
    np.testing.assert_allclose(embedder.encode(texts), plain, atol=1e-5)


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
    assert choose_k(2500, 40, ClusterConfig()) == 20
    assert choose_k(10, 40, ClusterConfig()) == 2
    assert choose_k(5, 40, ClusterConfig(k=64)) == 5
    with pytest.raises(ValueError, match="larger than"):
        train_kmeans(np.zeros((3, 4), np.float32), 5, ClusterConfig(), use_gpu=False)
