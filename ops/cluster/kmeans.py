"""Cluster stage: FAISS k-means on a sample of embeddings, then nearest-centroid assignment."""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Literal, Optional

import numpy as np

from pydantic import Field

from labelnext.ops.core.columns import CLUSTER_ID, DISTANCE, DOC_ID, EMBEDDING, MARGIN, PREDICTED_LABEL, RAND_KEY
from labelnext.ops.core.contract import StageContract
from labelnext.ops.core.settings import StageSettings

log = logging.getLogger(__name__)

# Assigner: what it needs and adds per row.
CONTRACT = StageContract("cluster", needs=(DOC_ID, EMBEDDING), adds=(CLUSTER_ID, DISTANCE, RAND_KEY))
MAX_DERIVED_K = 4096
MIN_CLUSTER_DOCS = 4


class ClusterConfig(StageSettings):
    """``cluster``: k-means size and training (whether it trains on a GPU lives in ``resources.cluster``)."""

    k: Optional[int] = Field(default=None, gt=0, description="number of clusters; derived from the budget when unset")
    labels_per_cluster: float = Field(default=1.0, gt=0, description="when k is unset, k = budget / labels_per_"
                                      "cluster (bench/quality.py chose it)")
    train_sample: int = Field(default=64, gt=0, description="training points per centroid (capped by corpus "
                              "size). k-means costs train_sample x k x dim x niter: 64 (faiss warns below 39) keeps "
                              "a 4,000-cluster training on a few CPU cores to minutes; the GPU configs afford 256")
    niter: int = Field(default=20, gt=0, description="k-means iterations")
    init: Literal["auto", "random", "kmeans++"] = Field(
        default="auto", description="k-means seeding: random training points (faiss), k-means++ (spreads the "
        "seeds, so small modes get their own centroid), or auto: random below kmeanspp_min_k clusters, k-means++ "
        "from there; bench/quality.py chose it")
    kmeanspp_min_k: int = Field(default=50, gt=0, description="init auto: the smallest k seeded by k-means++")
    init_sample: int = Field(default=16, gt=0, description="kmeans++: seeding points per centroid, the first of the "
                             "(seeded, shuffled) training sample; seeding costs about init_sample x k^2 x dim x ln k")
    seed: int = Field(default=0, description="seed of the training sample, faiss k-means and k-means++ "
                      "seeding")
    warm_start: bool = Field(default=False, description="start k-means from the latest committed earlier run's "
                             "centroids when k and dimension match (cluster ids stay comparable night to night)")


def choose_k(n_docs: int, budget: int, cfg: ClusterConfig) -> int:
    """k from config, else ``budget / labels_per_cluster``, bounded so clusters are not tiny."""
    if n_docs <= 0:
        return 0
    if cfg.k is not None:
        return min(cfg.k, n_docs)
    k = math.ceil(max(budget, 1) / cfg.labels_per_cluster)
    return max(1, min(k, max(1, n_docs // MIN_CLUSTER_DOCS), MAX_DERIVED_K))


def seeding(k: int, cfg: ClusterConfig) -> str:
    """The seeding ``cfg.init`` resolves to for ``k`` clusters: "random" or "kmeans++".

    With few clusters k-means++ spends seeds on outliers (each far point is a likely next seed), and a budget
    that small is better spent on the big modes that random seeds land in; with many clusters random seeds
    miss the small modes that k-means++ reaches (bench/README.md, cold start).
    """
    if cfg.init == "auto":
        return "kmeans++" if k >= cfg.kmeanspp_min_k else "random"
    return cfg.init


def train_sample_size(n_docs: int, k: int, cfg: ClusterConfig) -> int:
    return min(n_docs, cfg.train_sample * k)


def train_kmeans(
    sample: np.ndarray, k: int, cfg: ClusterConfig, *, use_gpu: bool, init_centroids: Optional[np.ndarray] = None
) -> tuple[np.ndarray, float]:
    """Train spherical k-means (vectors are normalised); returns (centroids [k, d], objective)."""
    import faiss

    x = np.ascontiguousarray(sample, dtype=np.float32)
    n, d = x.shape
    if k > n:
        raise ValueError(f"cluster.k={k} is larger than the {n} documents available")
    kmeans = faiss.Kmeans(
        d,
        k,
        niter=cfg.niter,
        seed=cfg.seed,
        spherical=True,
        gpu=bool(use_gpu),
        verbose=False,
        # The sample is already sized by cluster.train_sample; stop faiss from warning or subsampling.
        max_points_per_centroid=max(cfg.train_sample, math.ceil(n / k)),
        min_points_per_centroid=1,
    )
    if init_centroids is None or init_centroids.shape != (k, d):
        init_centroids = (kmeans_plusplus_seeds(x, k, cfg, device="cuda" if use_gpu else "cpu")
                          if seeding(k, cfg) == "kmeans++" else None)
    if init_centroids is not None:
        kmeans.train(x, init_centroids=np.ascontiguousarray(init_centroids, dtype=np.float32))
    else:
        kmeans.train(x)
    objective = float(kmeans.obj[-1]) if len(kmeans.obj) else float("nan")
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32), objective


def kmeans_plusplus_seeds(x: np.ndarray, k: int, cfg: ClusterConfig, device: str = "cpu") -> np.ndarray:
    """Greedy k-means++ seeds (each step keeps the best of 2 + ln k draws, as scikit-learn does) from the first
    ``init_sample x k`` rows of ``x``, on ``device`` (the training task's GPU when it has one).

    The training rows arrive in a seeded random order, so their prefix is a random subsample.
    """
    import torch

    m = min(len(x), max(k, cfg.init_sample * k))
    pts = torch.from_numpy(np.ascontiguousarray(x[:m], dtype=np.float32)).to(device)
    sq = (pts * pts).sum(1)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    trials = 2 + int(math.log(k))

    def sq_dist(idx: torch.Tensor) -> torch.Tensor:  # m x len(idx) squared Euclidean distances
        return (sq[:, None] + sq[idx][None, :] - 2.0 * (pts @ pts[idx].T)).clamp_min_(0.0)

    chosen = torch.empty(k, dtype=torch.long, device=device)
    chosen[0] = torch.randint(m, (1,), generator=gen, device=device)
    closest = sq_dist(chosen[:1])[:, 0]
    for i in range(1, k):
        if float(closest.sum()) > 0:
            draws = torch.multinomial(closest, trials, replacement=True, generator=gen)
        else:  # every point coincides with a seed already: duplicates are unavoidable
            draws = torch.randint(m, (trials,), generator=gen, device=device)
        candidate = torch.minimum(sq_dist(draws), closest[:, None])
        best = torch.argmin(candidate.sum(0))  # stays on the device: no host round-trip
        chosen[i] = draws[best]
        closest = candidate[:, best]
    return pts[chosen].cpu().numpy()


def rand_keys(doc_ids: list[str], seed: int) -> np.ndarray:
    """Deterministic per-document random key (the diverse share takes the smallest keys per cluster)."""
    salt = str(seed).encode()
    return np.array(
        [int.from_bytes(hashlib.blake2b(d.encode("utf-8"), digest_size=8, salt=salt[:16]).digest(), "little") >> 11
         for d in doc_ids],
        dtype=np.int64,
    )


class Assigner:
    """Nearest centroid (cosine) for every embedding; centroids arrive once per actor.

    With a task model (``labelnext.ops.select.task_model.TaskModel``, or an object ref to one) it also adds the
    model's ``margin`` and ``predicted_label`` for every document.
    """

    def __init__(self, centroids, seed: int = 0, task_model=None):
        import faiss

        if not isinstance(centroids, np.ndarray):
            import ray

            centroids = ray.get(centroids)
        if task_model is not None and not hasattr(task_model, "margin"):
            import ray

            task_model = ray.get(task_model)
        self.index = faiss.IndexFlatIP(centroids.shape[1])
        self.index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        self.seed = seed
        self.task_model = task_model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = np.ascontiguousarray(np.stack(batch["embedding"]) if batch["embedding"].dtype == object
                                   else batch["embedding"], dtype=np.float32)
        sims, idx = self.index.search(emb, 1)
        batch[CLUSTER_ID] = idx[:, 0].astype(np.int32)
        batch[DISTANCE] = np.clip(1.0 - sims[:, 0], 0.0, 2.0).astype(np.float32)
        batch[RAND_KEY] = rand_keys([str(d) for d in batch["doc_id"]], self.seed)
        if self.task_model is not None:
            batch[MARGIN], batch[PREDICTED_LABEL] = self.task_model.margin(emb)
        return batch
