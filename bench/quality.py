"""Selection quality: does labelnext pick documents whose labels train a better classifier?

For every labelled Parquet file in ``../shared/data/`` (relative to the repo root): split into a pool and a
held-out test set, select ``budget`` pool documents with each strategy, "annotate" them with the gold labels,
train a logistic regression on their embeddings and report macro-F1 on the test set (mean +- std over seeds),
together with the number of documents each strategy sent through the LLM.

Every strategy except ``random`` goes through the real ops: ``Embedder``, ``train_kmeans``/``Assigner``,
``plan_candidates``/``block_candidates``/``merge_candidates``, ``Scorer`` and ``Selector``. The LLM scores are
deterministic per document, so every pool document is scored ONCE with the real ``Scorer`` and cached; the
strategies then look up the scores of the documents they would have sent to the LLM. The "LLM docs" column
counts what each strategy would score in a real run.

The cold-start rule is chosen out of sample (``bench/lodo.py``): for each held-out dataset, picked on the other
datasets and reported on the held-out one. scikit-activeml's TypiClust and ProbCover are the published anchors.
``--rounds R --per-round B`` runs the simulated nightly label loop instead (``bench/loop.py``).

    python -m bench.quality            # full run (long on a small CPU machine; see bench/README.md)
    python -m bench.quality --quick    # a few minutes: one dataset subset, budgets 20/50, 5 seeds
    python -m bench.quality --rounds 5 --per-round 200    # the nightly loop, 15 seeds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import anchors, lodo, loop  # noqa: E402
from bench.llm_features import llm_features  # noqa: E402
from bench.result_cache import ResultCache  # noqa: E402
from bench.common import (  # noqa: E402
    OUT, SHARED_DATA, SHARED_DATA_DISPLAY, cache_key, file_sha256, log, machine_description, markdown_table,
    save_array, setup_env, slug,
)

SPLIT_SEED = 0
TEST_FRACTION = 0.3
SCORE_COLUMNS = ("uncertainty", "max_entropy", "nll", "n_tokens", "truncated")
SCORE_CHUNK = 64
CACHE = OUT / "cache"
SAMPLE_SALT = 7919  # k-means sample keys drawn apart from the candidates' random keys, as in the pipeline
BLOCK_ROWS = 1000  # candidate top-k runs block-wise like the pipeline, then merges
# Inverse regularisation of the probe classifier. Chosen once, before comparing strategies, as the value that
# maximises *random* selection's F1 (C=1 on unit-norm embeddings barely moves off the class prior at B<=50, so
# it mostly measured the class balance of a selection); the same C is used for every strategy.
LR_C = 10.0

BUDGETS = (20, 50, 100, 200)
# 100 seeds: at B>=50 the gaps between rules are 0.002-0.02 F1 while one seed's paired difference spreads by
# 0.05 on IMDB, so 30 seeds left an SE of 0.010 there; selection over cached scores is cheap next to the
# one-off LLM scoring.
SEEDS = 100
QUICK_BUDGETS = (20, 50)
QUICK_SEEDS = 5  # 2 seeds flip the sign of B=50 gaps on the 1,000-doc subset; 5 cost seconds more
QUICK_DATASET = "ag_news_test"
QUICK_POOL = 1000
QUICK_TEST = 1500
LOOP_SEEDS = 15
LOOP_QUICK_SEEDS = 2
REQUIRED = ("random",)  # every difference is taken against it
# With OMP_NUM_THREADS=1 (bench/README.md) scikit-learn's k-means with B clusters (TypiClust) takes about a second
# per call here, so the anchors run on every seed; comparisons with them are paired on the seeds both ran.
ANCHOR_SEEDS = 100


# -- strategies -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Strategy:
    name: str
    kind: str  # "random" | "entropy_all" | "anchor" | "pipeline"
    overrides: tuple[str, ...] = ()  # ``--set`` style overrides on the default config
    note: str = ""
    family: bool = False  # a cold-start rule the leave-one-dataset-out choice picks from


# The cold-start family: k (budget/2 or budget clusters) x quotas (by size, or one per cluster first) x the
# preference within a cluster (uniform: the floor; nearest to the centroid; LLM uncertainty against typicality).
K_SETTINGS = {"B/2": "cluster.labels_per_cluster=2", "B": "cluster.labels_per_cluster=1"}
# k-means seeding (cluster.init) and its name suffix; auto is k-means++ from cluster.kmeanspp_min_k clusters
INITS = {"random": "", "kmeans++": "+kpp", "auto": "+auto"}
WITHIN = {"stratified": "uniform within each cluster (random key)", "cluster_only": "nearest to the centroid",
          "typical_uncertain": "LLM uncertainty percentile - distance percentile"}


def family() -> list[Strategy]:
    out = []
    for rule, within in WITHIN.items():
        for k_name, k_set in K_SETTINGS.items():
            for quota in ("size", "cover"):
                for init in INITS:
                    # At k = B/2 size quotas visit every cluster already (no cover), and seeding is only
                    # compared where it was expected to matter (one cluster per label).
                    if k_name == "B/2" and (quota == "cover" or init != "random"):
                        continue
                    name = f"{rule}@{k_name}" + ("+cover" if quota == "cover" else "") + INITS[init]
                    seeds = ("auto seeding (k-means++ from cluster.kmeanspp_min_k clusters, random below)"
                             if init == "auto" else f"{init} seeding")
                    note = (f"k = {k_name}, {seeds}, quotas by "
                            f"{'size' if quota == 'size' else 'one per cluster, then size'}, {within}")
                    out.append(Strategy(name, "pipeline", (k_set, f"select.rule={rule}", f"select.quota={quota}",
                                                           f"cluster.init={init}"), note, family=True))
    return out


def strategies(default_rule: str) -> list[Strategy]:
    """The strategies compared; ``labelnext`` is the default config, unmodified."""
    return [
        Strategy("random", "random", note="uniform sample of the pool, no LLM"),
        Strategy("typiclust", "anchor", note="scikit-activeml TypiClust, its defaults (k-means with budget clusters, "
                                             "the most typical document of each)"),
        Strategy("probcover", "anchor", note="scikit-activeml ProbCover, its defaults (greedy ball coverage)"),
        Strategy("entropy_all", "entropy_all", note="LLM over every pool doc, top-B by mean token entropy"),
        Strategy("labelnext", "pipeline", (), f"the default config (rule {default_rule})"),
        *family(),
    ]


# -- data -------------------------------------------------------------------------------------------------
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


def _score_cache_path(ds: Dataset, cfg) -> Path:
    key = cache_key(ds.sha256, cfg.model, cfg.max_tokens, cfg.truncation, cfg.dtype)
    return CACHE / f"scores-{slug(ds.name)}-{key}.parquet"


def _read_scores(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    table = pq.read_table(path)
    return {row["doc_id"]: row for row in table.to_pylist()}


def _write_scores(path: Path, scores: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(list(scores.values())), tmp)
    tmp.replace(path)


def llm_scores(ds: Dataset, rows: np.ndarray, cfg) -> pa.Table:
    """Real ``Scorer`` output for the given rows; each document is scored once and cached on disk."""
    path = _score_cache_path(ds, cfg)
    scores = _read_scores(path)
    todo = [int(r) for r in rows if ds.ids[r] not in scores]
    if todo:
        _score_missing(ds, todo, cfg, scores, path)
    return pa.Table.from_pylist([scores[ds.ids[r]] for r in rows])


def _score_missing(ds: Dataset, todo: list[int], cfg, scores: dict[str, dict], path: Path) -> None:
    from labelnext.ops.score.scorer import Scorer

    log(f"{ds.name}: scoring {len(todo)} docs with {cfg.model} ({cfg.backend}); cache {path.name}")
    scorer = Scorer(cfg, device="auto", num_cpus=os.cpu_count() or 1)
    todo.sort(key=lambda r: len(str(ds.texts[r])))  # similar lengths batch with less padding
    start, done, last_flush = time.perf_counter(), 0, time.perf_counter()
    for i in range(0, len(todo), SCORE_CHUNK):
        chunk = todo[i: i + SCORE_CHUNK]
        batch = {"doc_id": np.array([ds.ids[r] for r in chunk], dtype=object),
                 "text": np.array([str(ds.texts[r]) for r in chunk], dtype=object)}
        out = scorer(batch)
        for j, r in enumerate(chunk):
            scores[ds.ids[r]] = {"doc_id": ds.ids[r], **{c: _py(out[c][j]) for c in SCORE_COLUMNS}}
        done += len(chunk)
        if time.perf_counter() - last_flush > 60 or done == len(todo):
            _write_scores(path, scores)
            last_flush = time.perf_counter()
            rate = done / (time.perf_counter() - start)
            log(f"{ds.name}: scored {done}/{len(todo)} ({rate:.1f} docs/s)")


def _py(value):
    return value.item() if isinstance(value, np.generic) else value


# -- selection through the real ops -----------------------------------------------------------------------
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
        for name in SCORE_COLUMNS:
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


def needs_llm(strategies_: list[Strategy]) -> bool:
    """Whether any strategy ranks by LLM scores (then every pool document is scored once, and cached)."""
    from labelnext.ops.select.selector import uses_llm
    from labelnext.pipelines.config import load_config

    return any(s.kind == "entropy_all" or (s.kind == "pipeline" and uses_llm(load_config(overrides=list(
        s.overrides)).select)) for s in strategies_)


def load_pool(ds: Dataset, cfg, scored: bool) -> tuple[Pool, np.ndarray]:
    """The pool (with LLM scores when ``scored``) and the embeddings of every row of the file."""
    emb_all = embeddings(ds, cfg.embed)
    scores = llm_scores(ds, ds.pool, cfg.score) if scored else None
    return Pool(ids=ds.ids[ds.pool], emb=emb_all[ds.pool], scores=scores), emb_all


# A label-round setting added after the cold-start results were cached: it cannot change a cold start, so
# cold-start keys leave it out and those results stay valid; the loop's keys (with_labels) hold it.
LABELS_ONLY_SELECT = {"margin_distance_weight"}


def strategy_settings(st: Strategy, with_labels: bool = False) -> str:
    """The resolved settings a strategy's result depends on (the default config's, for ``labelnext``)."""
    from labelnext.pipelines.config import load_config

    if st.kind in ("random", "anchor"):
        return st.kind
    cfg = load_config(overrides=list(st.overrides))
    select = cfg.select.model_dump_json(exclude=None if with_labels else LABELS_ONLY_SELECT)
    return cache_key(cfg.cluster.model_dump_json(), cfg.candidates.model_dump_json(), select,
                     cfg.embed.model, cfg.score.model, cfg.score.max_tokens)


def bench_dataset(ds: Dataset, strategies_: list[Strategy], budgets: tuple[int, ...], seeds: int, cfg,
                  cache: ResultCache) -> list[Result]:
    settings = {st.name: strategy_settings(st) for st in strategies_}
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


# -- reporting --------------------------------------------------------------------------------------------
def _agg(results: list[Result]) -> dict[tuple[str, int, str], tuple[float, float, float]]:
    groups: dict[tuple[str, int, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.dataset, r.budget, r.strategy), []).append(r)
    return {k: (float(np.mean([r.f1 for r in v])), float(np.std([r.f1 for r in v])),
                float(np.mean([r.llm_docs for r in v]))) for k, v in groups.items()}


def dataset_tables(results: list[Result], names: list[str], budgets: tuple[int, ...], order: list[str]) -> str:
    agg = _agg(results)
    parts = []
    for ds in names:
        rows = []
        for st in order:
            cells = []
            for b in budgets:
                m, s, llm = agg[(ds, b, st)]
                cells.append(f"{m:.3f} ± {s:.3f} ({llm:.0f})")
            rows.append([st, *cells])
        parts.append(f"### {ds}\n\n" + markdown_table(["strategy", *[f"B={b}" for b in budgets]], rows))
    return "\n\n".join(parts)


def average(results: list[Result], names: list[str], budgets: tuple[int, ...], order: list[str]):
    """Per (budget, strategy): mean over datasets of the seed-mean F1, mean seed-std, mean LLM docs."""
    agg = _agg(results)
    return {(b, st): tuple(float(np.mean([agg[(ds, b, st)][i] for ds in names])) for i in range(3))
            for b in budgets for st in order}


def average_table(avg, budgets: tuple[int, ...], order: list[str]) -> str:
    rows = [[st, *[f"{avg[(b, st)][0]:.3f} ± {avg[(b, st)][1]:.3f} ({avg[(b, st)][2]:.0f})" for b in budgets]]
            for st in order]
    return markdown_table(["strategy", *[f"B={b}" for b in budgets]], rows)


def paired_delta(results: list[Result], names: list[str], budgets: tuple[int, ...], order: list[str],
                 reference: str = "random") -> dict[tuple[int, str], tuple[float, float]]:
    """Per (budget, strategy): mean over seeds of (dataset-averaged F1 - the reference's at the same seed index),
    with its standard error over seeds."""
    f1 = {(r.dataset, r.budget, r.strategy, r.seed): r.f1 for r in results}
    out = {}
    for b in budgets:
        for st in order:
            seeds = sorted({r.seed for r in results if r.strategy == st}
                           & {r.seed for r in results if r.strategy == reference})
            diffs = np.array([np.mean([f1[(d, b, st, s)] - f1[(d, b, reference, s)] for d in names]) for s in seeds])
            se = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
            out[(b, st)] = (float(diffs.mean()), se)
    return out


def delta_table(results: list[Result], delta, names: list[str], budgets: tuple[int, ...], order: list[str]) -> str:
    """Mean gain over random (± SE over seeds, datasets averaged per seed) and the worst dataset's gain."""
    f1 = f1_index(results)
    rows = []
    for st in order:
        if st == "random":
            continue
        cells = []
        for b in budgets:
            worst = min(names, key=lambda d: lodo.paired(f1, d, b, st, "random")[0])
            cells.append(f"{delta[(b, st)][0]:+.3f} ± {delta[(b, st)][1]:.3f} "
                         f"(worst {lodo.paired(f1, worst, b, st, 'random')[0]:+.3f} {worst})")
        rows.append([st, *cells])
    return markdown_table(["strategy", *[f"B={b}" for b in budgets]], rows)


def f1_index(results: list[Result]) -> lodo.F1:
    return {(r.dataset, r.budget, r.strategy, r.seed): r.f1 for r in results}


def verdict(results: list[Result], names: list[str], budgets: tuple[int, ...], family_names: list[str],
            rule: str, quick: bool) -> str:
    f1 = f1_index(results)
    budgets_ = list(budgets)
    parts = []
    if any(k[2] == "labelnext" for k in f1) and any(k[2] == "typiclust" for k in f1):
        ok, lines = lodo.acceptance(f1, "labelnext", names, budgets_)
        parts = [f"Default (`{rule}`, the `labelnext` row): {'PASSES' if ok else 'does NOT pass'} the cold-start "
                 "acceptance (level with random on every dataset and budget, mean - SE >= 0 paired by seed; level "
                 "with TypiClust on the mean over datasets).", "", lines]
    if quick:
        parts += ["", "(--quick: few seeds on a subset, too noisy to decide anything; the full run decides.)"]
    if family_names:
        parts += ["", "### Leave one dataset out", "",
                  "For each held-out dataset the cold-start rule is picked on the other datasets only and reported "
                  "on the held-out one. Cells: gain over random ± SE (paired by seed) / gain over TypiClust. "
                  "Criteria (`bench/lodo.py`): `robust` = fewest (dataset, budget) cells significantly below random "
                  "(mean + SE < 0), then the largest mean gain; `worst` = the largest worst-cell mean gain."]
        for criterion in lodo.CRITERIA:
            picks = lodo.lodo(f1, family_names, names, budgets_, criterion)
            parts += ["", f"Criterion `{criterion}`:", "", lodo.lodo_table(f1, picks, budgets_)]
    return "\n".join(parts)


def render(results: list[Result], names: list[str], budgets: tuple[int, ...], seeds: int, order: list[str],
           family_names: list[str], notes: list[str], cfg, quick: bool) -> str:
    avg = average(results, names, budgets, order)
    delta = paired_delta(results, names, budgets, order)
    header = [
        f"# Selection quality{' (--quick)' if quick else ''}",
        "",
        f"Machine: {machine_description()}. Seeds: {seeds} (k-means seed and training sample, candidate random keys, "
        "random sample, the anchors' random state).",
        f"Cells: test macro-F1 mean ± std over seeds (LLM docs scored). Split: {1 - TEST_FRACTION:.0%} pool / "
        f"{TEST_FRACTION:.0%} held-out test, stratified, seed {SPLIT_SEED}. Classifier: LogisticRegression(C={LR_C:g}) on the "
        f"selected docs' {cfg.embed.model} embeddings.",
        f"LLM: {cfg.score.model} (transformers backend, max_tokens {cfg.score.max_tokens}). Every pool document was "
        "scored once with the real Scorer and cached; the scores are deterministic per document, so entropy_all "
        "and the candidate-based strategies look up the same per-doc scores. 'LLM docs' is what each strategy "
        "would score in a real run.",
        "",
        *notes,
        "",
        "## Average over datasets",
        "",
        average_table(avg, budgets, order),
        "",
        "Difference to random selection, paired by seed index and averaged over datasets (mean ± standard error "
        "over seeds), and the worst single dataset's mean difference:",
        "",
        delta_table(results, delta, names, budgets, order),
        "",
        verdict(results, names, budgets, family_names, cfg.select.rule, quick),
        "",
        "## Per dataset",
        "",
        dataset_tables(results, names, budgets, order),
        "",
        "## Strategies",
        "",
    ]
    return "\n".join(header) + "\n"


def strategy_notes(strategies_: list[Strategy]) -> str:
    return "\n".join(f"- `{s.name}`: {s.note or ', '.join(s.overrides)}" for s in strategies_)


# -- main -------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one dataset subset, budgets 20/50, 5 seeds")
    p.add_argument("--datasets", nargs="*", help="dataset file stems (default: all)")
    p.add_argument("--budgets", nargs="*", type=int)
    p.add_argument("--seeds", type=int)
    p.add_argument("--pool-cap", type=int)
    p.add_argument("--strategies", nargs="*", help=f"subset of strategies (always with {', '.join(REQUIRED)}; "
                   f"loop: {', '.join(loop.REQUIRED)})")
    p.add_argument("--fresh", action="store_true", help="recompute results cached in bench/out/cache")
    p.add_argument("--no-llm", action="store_true", help="skip the strategies that rank by LLM scores (no scoring)")
    p.add_argument("--rounds", type=int, help="simulated nightly loop: this many rounds (bench/loop.py)")
    p.add_argument("--per-round", type=int, default=200, help="loop: labels bought per round")
    p.add_argument("--out", type=Path, help="default bench/out/quality.md (loop: bench/out/loop.md)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="loop only: config override for labelnext's rounds with labels (repeatable)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not SHARED_DATA.is_dir() or not any(SHARED_DATA.glob("*.parquet")):
        print(f"bench.quality: no labelled data in {SHARED_DATA_DISPLAY} (relative to the repo root); skipping.")
        return 0
    setup_env()
    from labelnext.pipelines.config import load_config

    base = load_config(overrides=args.set or [])
    cfg = base.model_copy(update={
        "score": base.score.model_copy(update={"backend": "transformers"}),
    })
    budgets = tuple(args.budgets or (QUICK_BUDGETS if args.quick else BUDGETS))
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    names = args.datasets or ([QUICK_DATASET] if args.quick else None)
    pool_cap = args.pool_cap or (QUICK_POOL if args.quick else None)
    strategies_ = [s for s in strategies(cfg.select.rule)
                   if (not args.strategies or s.name in args.strategies or s.name in REQUIRED)
                   and not (args.no_llm and needs_llm([s]))]
    if args.rounds:
        return main_loop(args, names, pool_cap, cfg)
    if args.set:
        raise SystemExit("bench.quality: --set applies to the loop (--rounds) only; the cold-start strategies "
                         "carry their own settings")
    results, used = [], []
    cache = ResultCache(CACHE / "quality-results-v2.jsonl", fresh=args.fresh)
    for path in discover(names):
        ds = split(load_dataset(path), pool_cap, QUICK_TEST if args.quick else None)
        log(f"{ds.name}: pool {len(ds.pool)}, test {len(ds.test)}, classes {len(set(ds.labels))}")
        results += bench_dataset(ds, strategies_, budgets, seeds, cfg, cache)
        used.append(ds.name)
    if not used:
        print(f"bench.quality: none of {names} found in {SHARED_DATA_DISPLAY}; skipping.")
        return 0
    notes = [f"Pool cap: {pool_cap} docs per dataset." if pool_cap else ""]
    text = render(results, used, budgets, seeds, [s.name for s in strategies_],
                  [s.name for s in strategies_ if s.family], notes, cfg, args.quick)
    text += strategy_notes(strategies_) + "\n"
    _write(args.out or OUT / "quality.md", text)
    return 0


def main_loop(args: argparse.Namespace, names: Optional[list[str]], pool_cap: Optional[int], cfg) -> int:
    results, used = [], []
    cache = ResultCache(CACHE / "loop-results.jsonl", fresh=args.fresh)
    seeds = args.seeds or (LOOP_QUICK_SEEDS if args.quick else LOOP_SEEDS)
    loop_strategies = loop.chosen(args.strategies)
    for path in discover(names):
        ds = split(load_dataset(path), pool_cap, QUICK_TEST if args.quick else None)
        pool, emb_all = load_pool(ds, cfg, loop.needs_llm(loop_strategies, cfg.select))
        features = (llm_features(ds.name, ds.sha256, [str(t) for t in ds.texts[ds.pool]], ds.pool, cfg.score)
                    if loop.needs_llm_features(loop_strategies) else None)
        lp = loop.Loop(pool, ds.labels[ds.pool], emb_all[ds.test], ds.labels[ds.test], args.per_round, cfg, LR_C,
                       features)
        log(f"{ds.name}: loop over pool {len(ds.pool)}, {args.rounds} rounds of {args.per_round}")
        default = strategy_settings(Strategy("labelnext", "pipeline"), with_labels=True) + "".join(args.set or [])
        keys = {(st, s): cache_key(ds.sha256, len(ds.pool), len(ds.test), SPLIT_SEED, LR_C, args.rounds,
                                   args.per_round, s, st, "" if st in loop.DEFAULT_FREE else default,
                                   loop.CODE_VERSION.get(st, ""))
                for st in loop_strategies for s in range(seeds)}
        results += loop.bench_loop(ds.name, lp, loop_strategies, args.rounds, seeds, cache, keys)
        used.append(ds.name)
    if not used:
        print(f"bench.quality: none of {names} found in {SHARED_DATA_DISPLAY}; skipping.")
        return 0
    _write(args.out or OUT / "loop.md", loop.render_loop(results, used, loop_strategies, args.rounds, args.per_round))
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
