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
``--rounds R --per-round B`` runs the simulated nightly label loop instead (``bench/loop.py``). ``--task`` gives
the scoring LLM each dataset's task prompt and label names (``score.task``, ``bench/task_prompts.py``) and
measures the rules that read its answer (``bench/strategies.py: TASK_FAMILY``; with ``--rounds``, the loop's
``labelnext+llm`` and ``labelnext+disagree=W``) against the LLM-free default, random and TypiClust.

    python -m bench.quality            # full run (long on a small CPU machine; see bench/README.md)
    python -m bench.quality --quick    # a few minutes: one dataset subset, budgets 20/50, 5 seeds
    python -m bench.quality --rounds 5 --per-round 200    # the nightly loop, 15 seeds
    python -m bench.quality --task --pool-cap 600 --seeds 20      # the task-aware LLM rules (score.task)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import adaptive, lodo, loop, task_report  # noqa: E402
from bench.coldstart import LR_C, Result, bench_dataset, load_pool  # noqa: E402
from bench.common import (  # noqa: E402
    OUT, SHARED_DATA, SHARED_DATA_DISPLAY, cache_key, log, machine_description, markdown_table, setup_env,
)
from bench.datasets import CACHE, SPLIT_SEED, TEST_FRACTION, discover, load_dataset, split  # noqa: E402
from bench.llm_features import llm_features  # noqa: E402
from bench.result_cache import ResultCache  # noqa: E402
from bench.strategies import Strategy, needs_llm, strategies, strategy_settings, task_strategies  # noqa: E402
from bench.task_prompts import TASKS, task_config, task_pool_cap, zero_shot_accuracy  # noqa: E402

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
    p.add_argument("--task", action="store_true", help="the task-aware LLM rules: each dataset's task prompt and "
                   "label names in score.task (bench/task_prompts.py), against random, TypiClust and the default")
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
    strategies_ = [s for s in (task_strategies if args.task else strategies)(cfg.select.rule)
                   if (not args.strategies or s.name in args.strategies or s.name in REQUIRED)
                   and not (args.no_llm and needs_llm([s]))]
    if args.rounds:
        return main_loop(args, names, pool_cap, cfg)
    if args.set:
        raise SystemExit("bench.quality: --set applies to the loop (--rounds) only; the cold-start strategies "
                         "carry their own settings")
    results, used, accuracy = [], [], []
    cache = ResultCache(CACHE / "quality-results-v2.jsonl", fresh=args.fresh)
    for path in discover(names):
        if args.task and path.stem not in TASKS:
            continue
        ds = split(load_dataset(path), task_pool_cap(path.stem, pool_cap) if args.task else pool_cap,
                   QUICK_TEST if args.quick else None)
        log(f"{ds.name}: pool {len(ds.pool)}, test {len(ds.test)}, classes {len(set(ds.labels))}")
        ds_cfg = task_config(cfg, ds.name, ds.labels) if args.task else cfg
        results += bench_dataset(ds, strategies_, budgets, seeds, ds_cfg, cache)
        if args.task:
            counts = np.unique(ds.labels[ds.pool].astype(str), return_counts=True)[1]
            accuracy.append((ds.name, len(counts), len(ds.pool), *zero_shot_accuracy(ds, ds_cfg),
                             counts.max() / counts.sum()))
        used.append(ds.name)
    if not used:
        print(f"bench.quality: none of {names} found in {SHARED_DATA_DISPLAY}; skipping.")
        return 0
    order, family_names = [s.name for s in strategies_], [s.name for s in strategies_ if s.family]
    notes = [f"Pool cap: {pool_cap} docs per dataset." if pool_cap else ""]
    if args.task:
        notes = [f"Pool caps (documents): {', '.join(f'{d} {n}' for d, _, n, *_ in accuracy)}."]
        notes += task_notes(results, used, budgets, order, family_names, accuracy)
    text = render(results, used, budgets, seeds, order, family_names, notes, cfg, args.quick)
    text += strategy_notes(strategies_) + "\n"
    _write(args.out or OUT / ("task.md" if args.task else "quality.md"), text)
    return 0


def task_notes(results: list[Result], names: list[str], budgets: tuple[int, ...], order: list[str],
               family_names: list[str], accuracy: list) -> list[str]:
    """``--task``: the scoring LLM's accuracy, the rules against TypiClust and the goal."""
    f1 = f1_index(results)
    prompts = [f"- {d}: `{TASKS[d].template!r}`" + (f", score.max_tokens {TASKS[d].max_tokens} "
                                                    f"({TASKS[d].truncation})" if TASKS[d].max_tokens else "")
               for d in names]
    return ["", "## Task-aware LLM", "", "Task prompts (score.task.template; the choices are the label names):", "",
            *prompts, "", "The scoring LLM's answer on the pool's gold labels:", "",
            task_report.accuracy_table(accuracy), "",
            "Difference to TypiClust, paired by seed and averaged over datasets (± SE over seeds), and the worst "
            "dataset's:", "", task_report.versus_table(f1, names, list(budgets), order, "typiclust"), "",
            "Difference to the LLM-free default (`labelnext`), the same way:", "",
            task_report.versus_table(f1, names, list(budgets), [s for s in order if s != "random"], "labelnext"), "",
            task_report.goal(f1, family_names, names, list(budgets))]


def main_loop(args: argparse.Namespace, names: Optional[list[str]], pool_cap: Optional[int], cfg) -> int:
    results, used = [], []
    cache = ResultCache(CACHE / "loop-results.jsonl", fresh=args.fresh)
    seeds = args.seeds or (LOOP_QUICK_SEEDS if args.quick else LOOP_SEEDS)
    loop_strategies = loop.chosen(args.strategies, task=args.task)
    for path in discover(names):
        if args.task and path.stem not in TASKS:
            continue
        ds = split(load_dataset(path), task_pool_cap(path.stem, pool_cap) if args.task else pool_cap,
                   QUICK_TEST if args.quick else None)
        ds_cfg = task_config(cfg, ds.name, ds.labels) if args.task else cfg
        pool, emb_all = load_pool(ds, ds_cfg, loop.needs_llm(loop_strategies, cfg.select))
        features = (llm_features(ds.name, ds.sha256, [str(t) for t in ds.texts[ds.pool]], ds.pool, cfg.score)
                    if loop.needs_llm_features(loop_strategies) else None)
        lp = adaptive.AuditedLoop(pool, ds.labels[ds.pool], emb_all[ds.test], ds.labels[ds.test], args.per_round,
                                  ds_cfg, LR_C, features)
        log(f"{ds.name}: loop over pool {len(ds.pool)}, {args.rounds} rounds of {args.per_round}")
        default = strategy_settings(Strategy("labelnext", "pipeline"), with_labels=True) + "".join(args.set or [])
        keys = {(st, s): cache_key(ds.sha256, len(ds.pool), len(ds.test), SPLIT_SEED, LR_C, args.rounds,
                                   args.per_round, s, st, "" if st in loop.DEFAULT_FREE else default,
                                   loop.CODE_VERSION.get(st, ""),
                                   *((ds_cfg.score.task.model_dump_json(),) if st in loop.TASK_SELECT else ()))
                for st in loop_strategies for s in range(seeds)}
        results += loop.bench_loop(ds.name, lp, loop_strategies, args.rounds, seeds, cache, keys)
        used.append(ds.name)
    if not used:
        print(f"bench.quality: none of {names} found in {SHARED_DATA_DISPLAY}; skipping.")
        return 0
    _write(args.out or OUT / ("loop-task.md" if args.task else "loop.md"),
           loop.render_loop(results, used, loop_strategies, args.rounds, args.per_round)
           + adaptive.render(results, used, loop_strategies, args.rounds, args.per_round))
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)



if __name__ == "__main__":
    sys.exit(main())
