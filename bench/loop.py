"""Simulated nightly label loop: ``rounds`` selections of ``per_round`` documents each, the gold labels of
every round's selection fed back before the next one (``python -m bench.quality --rounds R --per-round B``).

Strategies, each starting from an empty label set on the same pool:
- ``random``: a uniform sample of the unlabelled pool every round.
- ``coldstart``: the default cold-start selection (no labels used) repeated on the unlabelled pool every round.
- ``margin``: round 1 the cold start; then the ``per_round`` lowest margins (top-1 minus top-2 probability) of a
  logistic regression trained on the labels so far.
- ``labelnext``: round 1 the cold start; then the Cluster-Margin design with the real ops: k-means over the
  unlabelled pool (``choose_k`` of the default config), the default quotas, lowest margin first within each
  cluster, near-duplicates removed by the ``Selector``.
- ``labelnext+entropy``: as ``labelnext``, with the LLM's mean token entropy as a tie-breaker inside a cluster
  (rank = margin percentile, minus ``ENTROPY_WEIGHT`` x entropy percentile).
- ``labelnext+probe``, ``labelnext+probe-only`` (run only when named in ``--strategies``): as ``labelnext``, the
  margin taken from the mean of the task model's probabilities and a linear probe's, or from the probe's alone:
  a logistic regression (``C=PROBE_C``) trained on the same labels over the scoring LLM's mean final hidden
  states (``bench/llm_features.py``, standardised over the pool). "Uncertainty from a model distilled for the
  task", measured before building it into the product.
- ``typiclust``, ``probcover``: scikit-activeml's strategies (their defaults) given the labels so far.
- ``labelnext+audit``, ``adaptive`` (run only when named; ``bench/adaptive.py``, played by its ``AuditedLoop``):
  ``labelnext`` with the product's audit sample first in every round with a task model, and the audited loop
  whose remaining budget the product's bandit splits between cluster_margin, margin and coverage.
- ``whole_pool``: every pool document labelled in round 1: the ceiling of the task model on these embeddings,
  so ``whole_pool - random`` is the largest gain over random any strategy could show at a round.

Every strategy is scored with the product's task model (``labelnext.ops.select.task_model.TaskModel``, a logistic
regression with ``C=LR_C`` on the embeddings) trained on its labels so far.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from bench import anchors, coldstart
from bench.common import log, markdown_table
from bench.strategies import Strategy

# ``--task`` (score.task per dataset): the task-aware LLM's columns in the rounds with labels, as the product's
# settings put them (select.llm_with_labels: its choice entropy breaks near-ties of the margin;
# select.llm_disagreement: its label differing from the task model's lowers the margin by the weight).
TASK_SELECT = {"labelnext+llm": {"llm_with_labels": True},
               "labelnext+disagree=0.1": {"llm_with_labels": True, "llm_disagreement": 0.1},
               "labelnext+disagree=0.3": {"llm_with_labels": True, "llm_disagreement": 0.3}}
TASK_DEFAULT = ("random", "coldstart", "labelnext", *TASK_SELECT, "typiclust")  # what --task plays unless named
AUDITED = ("labelnext+audit", "adaptive", "adaptive+even", "adaptive+lead0", "adaptive+lead2")  # bench/adaptive.py: the audit and the bandit
LOOP_STRATEGIES = ("random", "coldstart", "margin", "labelnext", "labelnext+entropy", "labelnext+probe",
                   "labelnext+probe-only", *TASK_SELECT, *AUDITED, "typiclust", "probcover", "whole_pool")
PROBE_SHARE = {"labelnext+probe": 0.5, "labelnext+probe-only": 1.0}  # the probe's share of the probabilities
# Run only when --strategies names them: the LLM over every pool document (the task rules: with --task).
OPT_IN = (*PROBE_SHARE, *TASK_SELECT, *AUDITED)
REQUIRED = ("random",)  # every difference is taken against it
DEFAULT_FREE = ("random", "typiclust", "probcover", "whole_pool")  # results that do not depend on the default config
# Each anchor round refits scikit-learn k-means with (labels so far + B) clusters over the pool, or ProbCover's
# n x n graph: seconds per round with OMP_NUM_THREADS=1, so the anchors run on the same seeds as the rest.
ANCHOR_SEEDS = 15
# Bumped when a strategy's bench code changes what it selects (cached curves of the older code are not reused):
# the labelnext strategies go through the candidates stage, as the pipeline does.
CODE_VERSION = {"labelnext": "candidates", "labelnext+entropy": "candidates", **dict.fromkeys(PROBE_SHARE,
                                                                                            "candidates"),
                **dict.fromkeys(AUDITED, "audit-records-3")}
ENTROPY_WEIGHT = 0.25  # a tie-breaker: a tenth of a cluster's margin range outweighs it
# The probe's inverse regularisation: the best of 0.3 / 1 / 3 / 10 on ag_news for a probe trained on 1,000 random
# pool labels and scored on the rest of the pool (there it classifies better than the task model: macro-F1 0.88
# vs 0.85); CLINC150 prefers 10, with which the averaged strategy was further below labelnext (README).
PROBE_C = 3.0


@dataclass
class LoopResult:
    dataset: str
    strategy: str
    seed: int
    round: int
    labels: int
    f1: float
    audit: Optional[dict] = None  # the audited strategies' round record (bench/adaptive.py)


def fit(x: np.ndarray, y: np.ndarray, c: float):
    """The product's task model (``labelnext.ops.select.task_model``); None until the labels hold two classes."""
    from labelnext.ops.select.task_model import TaskModel

    if np.unique(np.asarray(y).astype(str)).size < 2:
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The number of unique classes")  # CLINC150's first rounds
        return TaskModel.fit(x, y, c=c)


def standardised(features: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per dimension over the pool, scaled by 1/sqrt(dim) to the norm of the embeddings."""
    f = np.asarray(features, dtype=np.float64)
    f = (f - f.mean(axis=0)) / (f.std(axis=0) + 1e-6)
    return (f / np.sqrt(f.shape[1])).astype(np.float32)


def macro_f1(model, only_class: str, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test macro-F1; a label set with a single class predicts that class."""
    from sklearn.metrics import f1_score

    test_y = np.asarray(test_y).astype(str)
    pred = model.predict(test_x) if model is not None else np.full(len(test_y), only_class, dtype=object)
    return float(f1_score(test_y, pred, average="macro", labels=np.unique(test_y), zero_division=0))


class Loop:
    """One dataset's pool; ``run`` plays every round of one strategy for one seed."""

    def __init__(self, pool, pool_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, per_round: int, cfg,
                 lr_c: float, llm_features: Optional[np.ndarray] = None):
        self.pool, self.pool_y, self.test_x, self.test_y = pool, pool_y, test_x, test_y
        self.per_round, self.cfg, self.lr_c = per_round, cfg, lr_c
        self.probe_x = None if llm_features is None else standardised(llm_features)

    def run(self, strategy: str, rounds: int, seed: int) -> list[tuple[int, float]]:
        if strategy in AUDITED:
            raise ValueError(f"{strategy} is played by bench.adaptive.AuditedLoop")
        n = len(self.pool.ids)
        labelled = np.empty(0, np.int64)
        model, out, f1 = None, [], float("nan")
        for r in range(rounds):
            if len(labelled) < n:  # a used-up pool keeps its last (whole-pool) result
                picked = self.pick(strategy, labelled, model, seed * 1000 + r)
                labelled = np.concatenate([labelled, picked])
                y = self.pool_y[labelled]
                model = fit(self.pool.emb[labelled], y, self.lr_c)
                f1 = macro_f1(model, str(y[0]), self.test_x, self.test_y)
            out.append((len(labelled), f1))
        return out

    def pick(self, strategy: str, labelled: np.ndarray, model, seed: int) -> np.ndarray:
        rest = np.setdiff1d(np.arange(len(self.pool.ids)), labelled)
        budget = min(self.per_round, len(rest))
        if strategy == "whole_pool":
            return rest
        if strategy == "random":
            return np.random.default_rng(10_000 + seed).choice(rest, budget, replace=False)
        if strategy in anchors.ANCHORS:
            return anchors.query(strategy, self.pool.emb, labelled, self.pool_y[labelled], budget, seed)
        if strategy == "coldstart" or model is None:
            return rest[self._cold_start(rest, budget, seed)]
        if strategy in PROBE_SHARE:
            margin, predicted = self._probe_margin(labelled, rest, model, PROBE_SHARE[strategy])
        else:
            margin, predicted = model.margin(self.pool.emb[rest])
        margin = margin.astype(np.float64)
        if strategy == "margin":
            return rest[np.argsort(margin, kind="stable")[:budget]]
        labels, counts = np.unique(self.pool_y[labelled].astype(str), return_counts=True)
        label_counts = dict(zip(labels.tolist(), counts.tolist()))
        if strategy in TASK_SELECT:
            task_select = self.cfg.select.model_copy(update=TASK_SELECT[strategy])
            return rest[self._cluster_margin(rest, margin, predicted, label_counts, budget, seed, False,
                                             task_select=task_select)]
        return rest[self._cluster_margin(rest, margin, predicted, label_counts, budget, seed,
                                         with_entropy=strategy.endswith("entropy"))]

    def _probe_margin(self, labelled: np.ndarray, rest: np.ndarray, model,
                      share: float) -> tuple[np.ndarray, np.ndarray]:
        """Margin and predicted label of the LLM probe's probabilities mixed with the task model's (the probe's
        ``share``)."""
        from labelnext.ops.select.task_model import top_two_margin

        if self.probe_x is None:
            raise ValueError("the probe strategies need the LLM features (bench/llm_features.py)")
        probe = fit(self.probe_x[labelled], self.pool_y[labelled], PROBE_C)
        assert np.array_equal(probe.classes, model.classes)  # both fitted on the same labels
        p = (1 - share) * model.predict_proba(self.pool.emb[rest]) + share * probe.predict_proba(self.probe_x[rest])
        return top_two_margin(p), model.classes[np.argmax(p, axis=1)]

    def _cold_start(self, rest: np.ndarray, budget: int, seed: int) -> np.ndarray:
        return coldstart.Runner(self.pool.subset(rest), budget, seed).pick(Strategy("labelnext", "pipeline")).rows

    def _cluster_margin(self, rest: np.ndarray, margin: np.ndarray, predicted: np.ndarray,
                        label_counts: dict[str, int], budget: int, seed: int, with_entropy: bool,
                        task_select=None) -> np.ndarray:
        """The real ``assign``, candidates stage and ``Selector`` (default config, or ``task_select`` with the
        task-aware LLM's columns attached) over the unlabelled documents with their margins, as the pipeline runs
        them when labels exist."""
        from labelnext.ops.select.selector import Selector

        _, table, sizes = self.margin_candidates(rest, margin, predicted, budget, seed, with_entropy,
                                                 scored=task_select is not None)
        selector = Selector(task_select or self.cfg.select, label_counts=label_counts)
        return coldstart.select_rows(selector.select(table, sizes, budget), table)

    def margin_candidates(self, rest: np.ndarray, margin: np.ndarray, predicted: np.ndarray, budget: int, seed: int,
                          with_entropy: bool = False, scored: bool = False) -> tuple[pa.Table, pa.Table, np.ndarray]:
        """(every unlabelled document's cluster assignment with its margin, the candidates stage's table with the
        margins and predicted labels, cluster sizes); ``_row`` in both is the position in ``rest``."""
        from labelnext.ops.core.columns import CLUSTER_ID, MARGIN, PREDICTED_LABEL
        from labelnext.ops.select.selector import percentile_within

        sub = self.pool.subset(rest)
        assigned, sizes = coldstart.assign(sub, budget, self.cfg, seed)
        assigned = assigned.append_column(MARGIN, pa.array(margin, pa.float64()))
        table = coldstart.with_features(coldstart.candidates(assigned, sizes, budget, self.cfg, near_key=MARGIN), sub,
                                        scored=scored)
        rows = table.column("_row").to_numpy()
        margin = margin[rows]
        table = table.drop_columns([MARGIN])
        if with_entropy:
            # Lowest margin first, the LLM's entropy breaking near-ties: both as percentiles within the cluster.
            clusters = table.column(CLUSTER_ID).to_numpy()
            entropy = sub.scores.column("uncertainty").to_numpy(zero_copy_only=False).astype(np.float64)[rows]
            entropy = np.where(np.isfinite(entropy), entropy, -np.inf)
            margin = percentile_within(margin, clusters) - ENTROPY_WEIGHT * percentile_within(entropy, clusters)
        table = table.append_column(MARGIN, pa.array(margin, pa.float64()))
        table = table.append_column(PREDICTED_LABEL, pa.array(predicted[rows].astype(str).tolist(), pa.string()))
        return assigned, table, sizes


def chosen(requested: Optional[list[str]], task: bool = False) -> list[str]:
    """The strategies a run plays: those requested (plus ``REQUIRED``), or all but the opt-in ones (``task``:
    ``TASK_DEFAULT``)."""
    default = [s for s in LOOP_STRATEGIES if s in TASK_DEFAULT] if task else [s for s in LOOP_STRATEGIES
                                                                               if s not in OPT_IN]
    return [s for s in LOOP_STRATEGIES if s in REQUIRED or s in (requested or default)]


def needs_llm_features(strategies: list[str]) -> bool:
    """Whether a probe strategy runs (then every pool document goes through the LLM once, cached)."""
    return bool(set(PROBE_SHARE) & set(strategies))


def needs_llm(strategies: list[str], select_cfg) -> bool:
    from labelnext.ops.select.selector import uses_llm

    cold_start_based = {"coldstart", "margin", "labelnext", *AUDITED} & set(strategies)
    return "labelnext+entropy" in strategies or bool(set(TASK_SELECT) & set(strategies)) or (bool(cold_start_based) and uses_llm(select_cfg))


def bench_loop(name: str, loop: Loop, strategies: list[str], rounds: int, seeds: int, cache,
               keys: dict[tuple[str, int], str]) -> list[LoopResult]:
    """Every strategy and seed; ``cache`` (a ``ResultCache``) keeps each (strategy, seed) curve by ``keys``."""
    results = []
    for seed in range(seeds):
        for st in strategies:
            if st in anchors.ANCHORS and seed >= ANCHOR_SEEDS:
                continue
            if cache.get(keys[(st, seed)]) is None:
                cache.put(keys[(st, seed)], loop.run(st, rounds, seed))
            for r, (labels, f1, *audit) in enumerate(cache.get(keys[(st, seed)]), start=1):
                results.append(LoopResult(name, st, seed, r, labels, f1, audit[0] if audit else None))
        log(f"{name}: loop seed {seed} done")
    return results


# -- reporting --------------------------------------------------------------------------------------------
def _index(results: list[LoopResult]) -> dict[tuple[str, str, int, int], float]:
    return {(r.dataset, r.strategy, r.round, r.seed): r.f1 for r in results}


def _paired(f1, names: list[str], rnd: int, st: str, ref: str, seeds: list[int]) -> tuple[float, float]:
    """Mean over the seeds both strategies ran of the dataset-averaged difference, with its standard error."""
    seeds = [s for s in seeds if (names[0], st, rnd, s) in f1 and (names[0], ref, rnd, s) in f1]
    diffs = np.array([np.mean([f1[(d, st, rnd, s)] - f1[(d, ref, rnd, s)] for d in names]) for s in seeds])
    return float(diffs.mean()), float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")


def render_loop(results: list[LoopResult], names: list[str], strategies: list[str], rounds: int,
                per_round: int) -> str:
    f1 = _index(results)
    seeds = sorted({r.seed for r in results})
    rnds = list(range(1, rounds + 1))
    head = ["strategy", *[f"{r * per_round} labels" for r in rnds]]

    def mean(st, r, ds=names):
        return float(np.mean([f1[(d, st, r, s)] for d in ds for s in seeds if (d, st, r, s) in f1]))

    avg = markdown_table(head, [[st, *[f"{mean(st, r):.3f}" for r in rnds]] for st in strategies])
    deltas = []
    for st in strategies:
        for ref in ("random", "coldstart"):
            if st == ref or (ref == "coldstart" and (st == "random" or ref not in strategies)):
                continue
            cells = []
            for r in rnds:
                m, se = _paired(f1, names, r, st, ref, seeds)
                worst = min(names, key=lambda d: mean(st, r, [d]) - mean(ref, r, [d]))
                cells.append(f"{m:+.3f} ± {se:.3f} (worst {mean(st, r, [worst]) - mean(ref, r, [worst]):+.3f} "
                             f"{worst})")
            deltas.append([f"{st} - {ref}", *cells])
    per_ds = [f"### {d}\n\n" + markdown_table(head, [[st, *[f"{mean(st, r, [d]):.3f}" for r in rnds]]
                                                     for st in strategies]) for d in names]
    return "\n".join([
        f"# Simulated nightly loop: {rounds} rounds of {per_round} labels, {len(seeds)} seeds "
        f"({min(len(seeds), ANCHOR_SEEDS)} for the anchors)",
        "",
        "Macro-F1 of the task model (logistic regression on the labels so far) on the held-out test split, "
        "averaged over datasets and seeds. A pool smaller than the labels asked for is used up: its later rounds "
        "are the whole pool for every strategy.",
        "",
        avg,
        "",
        "Differences, paired by seed and averaged over datasets (± SE over seeds; worst single dataset):",
        "",
        markdown_table(["difference", *head[1:]], deltas),
        "",
        loop_verdict(f1, names, strategies, rounds, per_round, seeds),
        "",
        "## Per dataset",
        "",
        "\n\n".join(per_ds),
        "",
    ])


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def loop_verdict(f1, names: list[str], strategies: list[str], rounds: int, per_round: int, seeds: list[int]) -> str:
    lines = []
    if not {"labelnext", "coldstart", "typiclust"} <= set(strategies):
        return "(acceptance needs labelnext, coldstart and typiclust)"
    for labels in (600, 1000):
        if labels % per_round or labels // per_round > rounds:
            continue
        r = labels // per_round
        vr, vc = _paired(f1, names, r, "labelnext", "random", seeds), _paired(f1, names, r, "labelnext", "coldstart", seeds)
        lines.append(f"- {labels} labels: labelnext - random {vr[0]:+.4f} ± {vr[1]:.4f} (>= +0.050: "
                     f"{_verdict(vr[0] >= 0.05)}), labelnext - repeated cold start {vc[0]:+.4f} ± {vc[1]:.4f} "
                     f"(>= +0.020: {_verdict(vc[0] >= 0.02)})")
        if "whole_pool" in strategies:
            cr = _paired(f1, names, r, "whole_pool", "random", seeds)[0]
            cc = _paired(f1, names, r, "whole_pool", "coldstart", seeds)[0]
            lines.append(f"  - the most any strategy could gain here (the whole pool labelled): {cr:+.3f} over random"
                         f", {cc:+.3f} over the repeated cold start"
                         + ("; the target is above it" if cr < 0.05 or cc < 0.02 else ""))
    t = _paired(f1, names, 1, "labelnext", "typiclust", seeds)
    lines.append(f"- round 1: labelnext - TypiClust {t[0]:+.4f} ± {t[1]:.4f} (>= 0: {_verdict(t[0] >= 0)})")
    for r in range(2, rounds + 1) if "labelnext+entropy" in strategies else ():
        e = _paired(f1, names, r, "labelnext+entropy", "labelnext", seeds)
        lines.append(f"- LLM entropy as tie-breaker, {r * per_round} labels: {e[0]:+.3f} ± {e[1]:.3f}")
    return "\n".join(lines)
