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

    python -m bench.quality            # full run (long on a small CPU machine; see bench/README.md)
    python -m bench.quality --quick    # a few minutes: one dataset subset, budgets 20/50, 5 seeds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    OUT, SHARED_DATA, SHARED_DATA_DISPLAY, cache_key, file_sha256, log, machine_description, markdown_table,
    setup_env, slug,
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
# 30 seeds, not 5: at B>=50 the gaps between rules are 0.002-0.02 F1 and 5 or 10 seeds reorder them; selection
# over cached scores takes a few minutes, so the extra seeds cost little next to the one-off LLM scoring.
SEEDS = 30
QUICK_BUDGETS = (20, 50)
QUICK_SEEDS = 5  # 2 seeds flip the sign of B=50 gaps on the 1,000-doc subset; 5 cost seconds more
QUICK_DATASET = "ag_news_test"
QUICK_POOL = 1000
QUICK_TEST = 1500
REQUIRED = ("random", "entropy_all", "labelnext")  # the verdict compares these


# -- strategies -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Strategy:
    name: str
    kind: str  # "random" | "entropy_all" | "pipeline"
    overrides: tuple[str, ...] = ()  # ``--set`` style overrides on the default config
    note: str = ""


def strategies(default_rule: str) -> list[Strategy]:
    """The strategies compared; ``labelnext`` is the default config, unmodified."""
    return [
        Strategy("random", "random", note="uniform sample of the pool, no LLM"),
        Strategy("entropy_all", "entropy_all", note="LLM over every pool doc, top-B by mean token entropy"),
        Strategy("cluster_only", "pipeline", ("select.rule=cluster_only",), "nearest to centroid per quota, no LLM"),
        Strategy("labelnext", "pipeline", (), f"the default config (rule {default_rule})"),
        Strategy("typical_uncertain", "pipeline", ("select.rule=typical_uncertain", "select.typicality_weight=1.0"),
                 "size quotas x (uncertainty percentile - distance percentile) in cluster"),
        Strategy("typical_uncertain_w0.5", "pipeline",
                 ("select.rule=typical_uncertain", "select.typicality_weight=0.5")),
        Strategy("typical_uncertain_w2", "pipeline", ("select.rule=typical_uncertain", "select.typicality_weight=2.0")),
        Strategy("typical_uncertain_nll", "pipeline", ("select.rule=typical_uncertain", "select.score=nll")),
        Strategy("baseline", "pipeline", ("select.rule=baseline", "select.score=mean_entropy"),
                 "size quotas x highest mean entropy in cluster"),
        Strategy("baseline_nll", "pipeline", ("select.rule=baseline", "select.score=nll")),
        Strategy("baseline_max_entropy", "pipeline", ("select.rule=baseline", "select.score=max_entropy")),
        Strategy("baseline_cap0.8", "pipeline", ("select.rule=baseline", "select.entropy_cap_quantile=0.8")),
        Strategy("uncertainty_weighted", "pipeline", ("select.rule=uncertainty_weighted",)),
        Strategy("round_robin", "pipeline", ("select.rule=round_robin",)),
        Strategy("entropy_candidates", "pipeline", ("select.rule=entropy_only",),
                 "top-B entropy among the candidates only"),
        Strategy("baseline_diverse0", "pipeline", ("select.rule=baseline", "candidates.diverse_fraction=0.0")),
        Strategy("baseline_diverse1", "pipeline", ("select.rule=baseline", "candidates.diverse_fraction=1.0")),
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
    from labelnext.ops.embed import Embedder

    path = CACHE / f"emb-{slug(ds.name)}-{cache_key(ds.sha256, cfg.model, cfg.max_seq_length)}.npy"
    if path.is_file():
        return np.load(path)
    log(f"{ds.name}: embedding {len(ds.texts)} docs with {cfg.model}")
    emb = Embedder(cfg, device="cuda" if _has_cuda() else "cpu").encode([str(t) for t in ds.texts])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
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
    from labelnext.ops.score import Scorer

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
    scores: pa.Table  # aligned with ids


def _embedding_column(emb: np.ndarray) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).ravel())
    return pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])


def assign(pool: Pool, budget: int, cfg, seed: int) -> tuple[pa.Table, np.ndarray]:
    """k-means on a sample (seeded), every pool doc assigned; returns (assignment table, cluster sizes)."""
    from labelnext.ops.candidates import cluster_sizes
    from labelnext.ops.cluster import CLUSTER_ID, Assigner, choose_k, rand_keys, train_kmeans, train_sample_size

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


def candidates(assigned: pa.Table, sizes: np.ndarray, budget: int, cfg) -> pa.Table:
    from labelnext.ops.candidates import block_candidates, merge_candidates, plan_candidates

    plan = plan_candidates(sizes, budget, cfg.candidates)
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

    def __init__(self, pool: Pool, budget: int, seed: int):
        self.pool, self.budget, self.seed = pool, budget, seed
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
        from labelnext.ops.select import Selector

        n = len(self.pool.ids)
        if strategy.kind == "random":
            rng = np.random.default_rng(10_000 + self.seed)
            return Picked(np.sort(rng.choice(n, min(self.budget, n), replace=False)), 0)
        cfg = self._config(strategy.overrides)
        assigned, sizes = self._assigned(cfg)
        if strategy.kind == "entropy_all":
            table = with_features(assigned, self.pool, scored=True)
            sel_cfg = cfg.select.model_copy(update={"rule": "entropy_only", "score": "mean_entropy",
                                                     "entropy_cap_quantile": None})
            return Picked(select_rows(Selector(sel_cfg).select(table, sizes, self.budget), table), n)
        scored = cfg.select.rule != "cluster_only"
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


def bench_dataset(ds: Dataset, strategies_: list[Strategy], budgets: tuple[int, ...], seeds: int, cfg) -> list[Result]:
    emb_all = embeddings(ds, cfg.embed)
    pool = Pool(ids=ds.ids[ds.pool], emb=emb_all[ds.pool], scores=llm_scores(ds, ds.pool, cfg.score))
    test_x, test_y = emb_all[ds.test], ds.labels[ds.test]
    pool_y = ds.labels[ds.pool]
    results = []
    for budget in budgets:
        for seed in range(seeds):
            runner = Runner(pool, budget, seed)
            for st in strategies_:
                picked = runner.pick(st)
                f1 = macro_f1(pool.emb[picked.rows], pool_y[picked.rows], test_x, test_y)
                results.append(Result(ds.name, budget, st.name, seed, f1, picked.llm_docs))
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
    seeds = sorted({r.seed for r in results})
    out = {}
    for b in budgets:
        for st in order:
            diffs = np.array([np.mean([f1[(d, b, st, s)] - f1[(d, b, reference, s)] for d in names]) for s in seeds])
            se = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
            out[(b, st)] = (float(diffs.mean()), se)
    return out


def delta_table(delta, budgets: tuple[int, ...], order: list[str]) -> str:
    rows = [[st, *[f"{delta[(b, st)][0]:+.3f} ± {delta[(b, st)][1]:.3f}" for b in budgets]]
            for st in order if st != "random"]
    return markdown_table(["strategy", *[f"B={b}" for b in budgets]], rows)


def verdict(avg, delta, budgets: tuple[int, ...], factor: float, rule: str, quick: bool) -> str:
    lines = []
    ok_all = True
    for b in budgets:
        m, r, e = avg[(b, "labelnext")][0], avg[(b, "random")][0], avg[(b, "entropy_all")][0]
        llm = avg[(b, "labelnext")][2]
        ok = m > r and m > e and llm <= factor * b
        ok_all &= ok
        d, se = delta[(b, "labelnext")]
        lines.append(f"- B={b}: labelnext {m:.3f} vs random {r:.3f} ({d:+.3f} ± {se:.3f} SE), vs entropy_all {e:.3f} "
                     f"({m - e:+.3f}); LLM docs {llm:.0f} <= {factor:g} x B: {'PASS' if ok else 'FAIL'}")
    head = f"Default rule `{rule}`: {'beats' if ok_all else 'does NOT beat'} random and entropy_all at every budget."
    if quick:
        head += " (--quick: few seeds on a subset, too noisy to decide anything; the full run decides.)"
    return head + "\n\n" + "\n".join(lines)


def render(results: list[Result], names: list[str], budgets: tuple[int, ...], seeds: int, order: list[str],
           notes: list[str], cfg, quick: bool) -> str:
    avg = average(results, names, budgets, order)
    delta = paired_delta(results, names, budgets, order)
    header = [
        f"# Selection quality{' (--quick)' if quick else ''}",
        "",
        f"Machine: {machine_description()}. Seeds: {seeds} (k-means seed and training sample, candidate random keys, random sample).",
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
        "over seeds):",
        "",
        delta_table(delta, budgets, order),
        "",
        verdict(avg, delta, budgets, cfg.candidates.factor, cfg.select.rule, quick),
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
    p.add_argument("--strategies", nargs="*", help=f"subset of strategies (always with {', '.join(REQUIRED)})")
    p.add_argument("--out", type=Path, default=OUT / "quality.md")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not SHARED_DATA.is_dir() or not any(SHARED_DATA.glob("*.parquet")):
        print(f"bench.quality: no labelled data in {SHARED_DATA_DISPLAY} (relative to the repo root); skipping.")
        return 0
    setup_env()
    from labelnext.pipelines.config import load_config

    base = load_config()
    cfg = base.model_copy(update={
        "score": base.score.model_copy(update={"backend": "transformers"}),
    })
    budgets = tuple(args.budgets or (QUICK_BUDGETS if args.quick else BUDGETS))
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    names = args.datasets or ([QUICK_DATASET] if args.quick else None)
    pool_cap = args.pool_cap or (QUICK_POOL if args.quick else None)
    strategies_ = [s for s in strategies(cfg.select.rule)
                   if not args.strategies or s.name in args.strategies or s.name in REQUIRED]
    results, used = [], []
    for path in discover(names):
        ds = split(load_dataset(path), pool_cap, QUICK_TEST if args.quick else None)
        log(f"{ds.name}: pool {len(ds.pool)}, test {len(ds.test)}, classes {len(set(ds.labels))}")
        results += bench_dataset(ds, strategies_, budgets, seeds, cfg)
        used.append(ds.name)
    if not used:
        print(f"bench.quality: none of {names} found in {SHARED_DATA_DISPLAY}; skipping.")
        return 0
    notes = [f"Pool cap: {pool_cap} docs per dataset." if pool_cap else ""]
    text = render(results, used, budgets, seeds, [s.name for s in strategies_], notes, cfg, args.quick)
    text += strategy_notes(strategies_) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
