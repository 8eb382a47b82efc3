"""Cold-start selection through the real ops, for one dataset's pool: ``assign`` (k-means on a seeded sample,
``Assigner``), the candidates stage, the ``Selector``; the anchors and random beside them; every selection scored
by the macro-F1 of a logistic regression trained on its gold labels (``bench_dataset``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from bench import anchors
from bench.common import cache_key, log
from bench.datasets import SPLIT_SEED, Dataset, embeddings
from bench.llm_scores import llm_scores
from bench.result_cache import ResultCache
from bench.strategies import Strategy, needs_llm, strategy_settings

SAMPLE_SALT = 7919  # k-means sample keys drawn apart from the candidates' random keys, as in the pipeline
BLOCK_ROWS = 1000  # candidate top-k runs block-wise like the pipeline, then merges
# Inverse regularisation of the probe classifier. Chosen once, before comparing strategies, as the value that
# maximises *random* selection's F1 (C=1 on unit-norm embeddings barely moves off the class prior at B<=50, so
# it mostly measured the class balance of a selection); the same C is used for every strategy.
LR_C = 10.0
# With OMP_NUM_THREADS=1 (bench/README.md) scikit-learn's k-means with B clusters (TypiClust) takes about a second
# per call here, so the anchors run on every seed; comparisons with them are paired on the seeds both ran.
ANCHOR_SEEDS = 100


@dataclass
class Pool:
    """The pool as the pipeline sees it after the embed stage, plus the cached per-doc LLM scores."""

    ids: np.ndarray
    emb: np.ndarray
    scores: Optional[pa.Table]  # aligned with ids; None when no strategy ranks by the LLM

    def subset(self, rows: np.ndarray) -> "Pool":
        scores = None if self.scores is None else self.scores.take(pa.array(rows, pa.int64()))
        return Pool(ids=self.ids[rows], emb=self.emb[rows], scores=scores)


def _embedding_column(emb: np.ndarray) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).ravel())
    return pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])


def assign(pool: Pool, budget: int, cfg, seed: int) -> tuple[pa.Table, np.ndarray]:
    """k-means on a sample (seeded), every pool doc assigned; returns (assignment table, cluster sizes)."""
    from labelnext.ops.cluster.candidates import cluster_sizes
    from labelnext.ops.cluster.kmeans import CLUSTER_ID, Assigner, choose_k, rand_keys, train_kmeans, train_sample_size

    n = len(pool.ids)
    cluster_cfg = cfg.cluster.model_copy(update={"seed": seed})
    k = choose_k(n, budget, cluster_cfg)
    # Like the pipeline: the training rows are chosen and ordered by a seeded hash of doc_id.
    order = np.argsort(rand_keys([str(d) for d in pool.ids], seed + SAMPLE_SALT), kind="stable")
    sample = pool.emb[order[: train_sample_size(n, k, cluster_cfg)]]
    centroids, _ = train_kmeans(sample, k, cluster_cfg, use_gpu=False)
    out = Assigner(centroids, seed=seed)({"doc_id": pool.ids, "embedding": pool.emb})
    table = pa.table({
        "doc_id": pa.array(pool.ids.tolist(), pa.string()),
        CLUSTER_ID: out[CLUSTER_ID], "distance": out["distance"], "_rand_key": out["_rand_key"],
        "_row": pa.array(np.arange(n, dtype=np.int64)),
    })
    return table, cluster_sizes(out[CLUSTER_ID], k)


def with_features(table: pa.Table, pool: Pool, scored: bool) -> pa.Table:
    """Attach embeddings (for near-duplicate removal) and, when the strategy uses the LLM, its scores."""
    rows = table.column("_row").to_numpy()
    table = table.append_column("embedding", _embedding_column(pool.emb[rows]))
    if scored:
        picked = pool.scores.take(pa.array(rows, pa.int64()))
        for name in picked.column_names:
            if name != "doc_id":
                table = table.append_column(name, picked.column(name))
    return table


def candidates(assigned: pa.Table, sizes: np.ndarray, budget: int, cfg, near_key: str = "distance") -> pa.Table:
    """The candidates stage as the pipeline runs it (nearest by ``near_key``: the margin when labels exist)."""
    from labelnext.ops.cluster.candidates import block_candidates, merge_candidates, plan_candidates

    plan = plan_candidates(sizes, budget, cfg.candidates, near_key=near_key,
                           distance_weight=cfg.select.margin_distance_weight)
    blocks = [block_candidates(assigned.slice(i, BLOCK_ROWS), plan) for i in range(0, assigned.num_rows, BLOCK_ROWS)]
    return merge_candidates(pa.concat_tables(blocks), plan)


def select_rows(selected: pa.Table, table: pa.Table) -> np.ndarray:
    """Pool row positions of the selected doc_ids."""
    pos = {d: r for d, r in zip(table.column("doc_id").to_pylist(), table.column("_row").to_pylist())}
    return np.array([pos[d] for d in selected.column("doc_id").to_pylist()], dtype=np.int64)


@dataclass
class Picked:
    rows: np.ndarray  # pool positions
    llm_docs: int


class Runner:
    """Runs every strategy for one (pool, budget, seed); clusterings are shared between strategies."""

    def __init__(self, pool: Pool, budget: int, seed: int, anchors_: Optional[anchors.ColdStartAnchors] = None):
        self.pool, self.budget, self.seed = pool, budget, seed
        self.anchors = anchors_ or anchors.ColdStartAnchors(pool.emb, budget)
        self._assignments: dict[tuple, tuple[pa.Table, np.ndarray]] = {}

    def _config(self, overrides: tuple[str, ...]):
        from labelnext.pipelines.config import load_config

        return load_config(overrides=list(overrides))

    def _assigned(self, cfg) -> tuple[pa.Table, np.ndarray]:
        key = (cfg.cluster.model_dump_json(),)
        if key not in self._assignments:
            self._assignments[key] = assign(self.pool, self.budget, cfg, self.seed)
        return self._assignments[key]

    def pick(self, strategy: Strategy) -> Picked:
        from labelnext.ops.select.selector import Selector, uses_llm

        n = len(self.pool.ids)
        if strategy.kind == "random":
            rng = np.random.default_rng(10_000 + self.seed)
            return Picked(np.sort(rng.choice(n, min(self.budget, n), replace=False)), 0)
        if strategy.kind == "anchor":
            return Picked(np.sort(self.anchors.pick(strategy.name, self.budget, self.seed)), 0)
        cfg = self._config(strategy.overrides)
        assigned, sizes = self._assigned(cfg)
        if strategy.kind == "entropy_all":
            table = with_features(assigned, self.pool, scored=True)
            sel_cfg = cfg.select.model_copy(update={"rule": "entropy_only", "score": "mean_entropy",
                                                     "entropy_cap_quantile": None})
            return Picked(select_rows(Selector(sel_cfg).select(table, sizes, self.budget), table), n)
        scored = uses_llm(cfg.select)
        table = with_features(candidates(assigned, sizes, self.budget, cfg), self.pool, scored=scored)
        selected = Selector(cfg.select).select(table, sizes, self.budget)
        return Picked(select_rows(selected, table), table.num_rows if scored else 0)


# -- evaluation -------------------------------------------------------------------------------------------
def macro_f1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Logistic regression on the selected docs' embeddings; a single-class selection predicts that class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    classes = np.unique(train_y)
    if len(classes) == 1:
        pred = np.full(len(test_y), classes[0], dtype=object)
    else:
        with warnings.catch_warnings():
            # CLINC150 at B <= 200: fewer labels than twice the classes, which scikit-learn warns about.
            warnings.filterwarnings("ignore", message="The number of unique classes")
            pred = LogisticRegression(C=LR_C, max_iter=2000).fit(train_x, train_y).predict(test_x)
    return float(f1_score(test_y, pred, average="macro", labels=np.unique(test_y), zero_division=0))


@dataclass
class Result:
    dataset: str
    budget: int
    strategy: str
    seed: int
    f1: float
    llm_docs: int



def load_pool(ds: Dataset, cfg, scored: bool) -> tuple[Pool, np.ndarray]:
    """The pool (with LLM scores when ``scored``) and the embeddings of every row of the file."""
    emb_all = embeddings(ds, cfg.embed)
    scores = llm_scores(ds, ds.pool, cfg.score) if scored else None
    return Pool(ids=ds.ids[ds.pool], emb=emb_all[ds.pool], scores=scores), emb_all



def bench_dataset(ds: Dataset, strategies_: list[Strategy], budgets: tuple[int, ...], seeds: int, cfg,
                  cache: ResultCache) -> list[Result]:
    """Every strategy, budget and seed on one dataset; a task-aware strategy's key holds the task prompt."""
    settings = {st.name: strategy_settings(st) + (cfg.score.task.model_dump_json() if st.task else "")
                for st in strategies_}
    keys = {(b, s, st.name): cache_key(ds.sha256, len(ds.pool), len(ds.test), SPLIT_SEED, LR_C, b, s, st.name,
                                       settings[st.name])
            for b in budgets for s in range(seeds) for st in strategies_}
    todo = [st for st in strategies_ if any(cache.get(keys[(b, s, st.name)]) is None
                                           for b in budgets for s in range(seeds))]
    pool, emb_all = load_pool(ds, cfg, needs_llm(todo))
    test_x, test_y = emb_all[ds.test], ds.labels[ds.test]
    pool_y = ds.labels[ds.pool]
    results = []
    cold_anchors = anchors.ColdStartAnchors(pool.emb, max(budgets))
    for budget in budgets:
        for seed in range(seeds):
            runner = Runner(pool, budget, seed, cold_anchors)
            for st in strategies_:
                if st.kind == "anchor" and seed >= ANCHOR_SEEDS:
                    continue
                key = keys[(budget, seed, st.name)]
                if cache.get(key) is None:
                    picked = runner.pick(st)
                    cache.put(key, [macro_f1(pool.emb[picked.rows], pool_y[picked.rows], test_x, test_y),
                                    picked.llm_docs])
                f1, llm_docs = cache.get(key)
                results.append(Result(ds.name, budget, st.name, seed, f1, llm_docs))
        log(f"{ds.name}: budget {budget} done")
    return results

