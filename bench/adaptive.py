"""The audited, adaptive loop: the product's audit sample and its bandit over ``select.rules`` on the simulated
nightly loop (``python -m bench.quality --rounds R --per-round B --strategies ... labelnext+audit adaptive``).

- ``labelnext+audit``: as ``labelnext``, but every round with a task model first draws ``audit_size(B,
  select.audit_share)`` documents uniformly from the unlabelled pool (the product's ``audit_keys``, salted per
  seed and round), then Cluster-Margin fills the rest through ``select_split``, as a run with one rule does. Its
  difference to ``labelnext`` is what the audit costs.
- ``adaptive``: the audited loop whose non-audit budget the product's bandit splits between cluster_margin,
  margin and coverage: ``rule_evidence`` on the labels so far (the rule that picked each, ``audit`` for the
  audit, ``cold_start`` for round 1; recency = round), ``split_shares`` with ``select.rules_explore``,
  ``allocate``, then ``select_split`` over the candidates table, as ``pipelines/loop_plan.py`` and the label
  loop wire them. Round 1 (no task model) is the cold start, as for ``labelnext``.

Each round with an audit records the audit's macro-F1 (and accuracy) estimate with its interval, scored with the
task model that existed before the audit's labels, next to the TRUE held-out value of that same model; ``render``
reports how often the interval holds the truth, the acceptance checks at the last round, the audit's cost and
the shares the bandit gave each rule.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench import loop
from bench.common import markdown_table

ADAPTIVE_RULES = ("cluster_margin", "margin", "coverage")
SINGLE_RULES = {"cluster_margin": "labelnext", "margin": "margin", "coverage": "coldstart"}  # rule: its strategy
COLD_START = "cold_start"  # the rule column of a night without a task model (the Selector's default)
WITHIN = 0.01  # "adaptive within 1 point of the best single rule"
# Variants of the bandit's constants (select.rules_explore, select.rules_lead), judged leave one dataset out
# against the product's defaults (explore 0.05, the first rule 3 standard errors ahead): explore 1 (every rule a
# third of the budget whatever the evidence: the control that says whether the evidence moved anything), no
# incumbent with explore 0.2, and the incumbent 2 standard errors ahead with explore 0.1.
SETTINGS = {"adaptive+even": (1.0, 0.0), "adaptive+lead0": (0.2, 0.0), "adaptive+lead2": (0.1, 2.0)}
VARIANTS = ("adaptive", *SETTINGS)
# Larger audits of the same round, for the record only (the first n of the same keys: the audit is their prefix):
# how the product's interval covers as the audit grows.
LARGER_AUDITS = (20, 50, 100)


def audit_draw(ids: np.ndarray, n: int, seed: int, rnd: int) -> np.ndarray:
    """Positions in ``ids`` of the round's audit: the ``n`` smallest of the product's audit keys, salted by seed
    and round (ties by doc id, as ``ops/select/audit.smallest`` breaks them)."""
    from labelnext.ops.select.audit import audit_keys, audit_salt

    if n <= 0:
        return np.empty(0, np.int64)
    names = np.asarray(ids).astype(str)
    keys = audit_keys(names.tolist(), audit_salt(seed, f"bench-round-{rnd}"))
    return np.lexsort((names, keys))[:n].astype(np.int64)


class AuditedLoop(loop.Loop):
    """``Loop`` that also plays the audited strategies (``loop.AUDITED``); every other strategy as before."""

    def run(self, strategy: str, rounds: int, seed: int) -> list:
        if strategy not in loop.AUDITED:
            return super().run(strategy, rounds, seed)
        n = len(self.pool.ids)
        labelled, rule_of, recency = np.empty(0, np.int64), np.empty(0, object), np.empty(0, np.float64)
        model, out, f1 = None, [], float("nan")
        for r in range(rounds):
            record = None
            if len(labelled) < n:
                rest = np.setdiff1d(np.arange(n), labelled)
                budget = min(self.per_round, len(rest))
                if model is None:
                    picked = rest[self._cold_start(rest, budget, seed * 1000 + r)]
                    rules = np.full(len(picked), COLD_START, dtype=object)
                else:
                    picked, rules, record = self.audited_round(strategy, rest, budget, labelled, rule_of, recency,
                                                               model, seed, r)
                    record["true_f1"] = f1
                labelled = np.concatenate([labelled, picked])
                rule_of = np.concatenate([rule_of, rules])
                recency = np.concatenate([recency, np.full(len(picked), float(r))])
                y = self.pool_y[labelled]
                model = loop.fit(self.pool.emb[labelled], y, self.lr_c)
                f1 = loop.macro_f1(model, str(y[0]), self.test_x, self.test_y)
            out.append((len(labelled), f1, record))
        return out

    def audited_round(self, strategy: str, rest: np.ndarray, budget: int, labelled: np.ndarray,
                      rule_of: np.ndarray, recency: np.ndarray, model, seed: int,
                      r: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """(pool positions picked, the rule of each, the round's record) for a round with a task model."""
        from labelnext.ops.core.columns import PREDICTED_LABEL, RULE
        from labelnext.ops.select.audit import audit_size, estimate
        from labelnext.ops.select.bandit import allocate, split_shares
        from labelnext.ops.select.split import select_split

        sel = self.cfg.select
        n_audit = audit_size(budget, sel.audit_share)
        order = audit_draw(self.pool.ids[rest], max(n_audit, *LARGER_AUDITS), seed, r)
        audit = order[:n_audit]
        margin, predicted = model.margin(self.pool.emb[rest])
        rules = ["cluster_margin"] if strategy == "labelnext+audit" else list(ADAPTIVE_RULES)
        evidence = self.evidence(labelled, rule_of, recency, rules) if len(rules) > 1 else {}
        explore, lead = SETTINGS.get(strategy, (sel.rules_explore, sel.rules_lead))
        shares = split_shares(rules, evidence, explore, lead) if len(rules) > 1 else {rules[0]: 1.0}
        counts = allocate(shares, budget - len(audit))
        assigned, table, sizes = self.margin_candidates(rest, margin.astype(np.float64), predicted, budget,
                                                        seed * 1000 + r)
        audit_table = assigned.take(pa.array(audit, pa.int64()))  # with the margin column already
        audit_table = audit_table.append_column(PREDICTED_LABEL, pa.array(predicted[audit].astype(str).tolist(),
                                                                          pa.string()))
        table = table.filter(pc.invert(pc.is_in(table.column("doc_id"), value_set=audit_table.column("doc_id"))))
        labels, label_n = np.unique(self.pool_y[labelled].astype(str), return_counts=True)
        selected = select_split(table, sizes, counts, sel, dict(zip(labels.tolist(), label_n.tolist())),
                                audit_table)
        where = {d: i for i, d in enumerate(self.pool.ids[rest].astype(str).tolist())}
        picked = rest[np.array([where[d] for d in selected.column("doc_id").to_pylist()], dtype=np.int64)]
        picked_rules = np.array(selected.column(RULE).to_pylist(), dtype=object)
        truth = self.pool_y[rest[audit]].astype(str)
        est = estimate(truth, predicted[audit].astype(str), confidence=sel.audit_confidence, seed=sel.seed)
        larger = {str(n): estimate(self.pool_y[rest[order[:n]]], predicted[order[:n]], sel.audit_confidence,
                                   seed=sel.seed) for n in LARGER_AUDITS if n <= len(order)}
        true_acc = float(np.mean(np.asarray(model.predict(self.test_x)).astype(str)
                                 == np.asarray(self.test_y).astype(str)))
        pool_f1 = loop.macro_f1(model, "", self.pool.emb[rest], self.pool_y[rest])  # what the audit samples
        record = {"audit_n": est.n, "f1_est": est.macro_f1, "f1_low": est.macro_f1_low,
                  "f1_high": est.macro_f1_high, "acc_est": est.accuracy, "acc_low": est.accuracy_low,
                  "acc_high": est.accuracy_high, "true_acc": true_acc, "pool_f1": pool_f1,
                  "shares": shares,
                  "picked": {k: int((picked_rules == k).sum()) for k in dict.fromkeys(picked_rules.tolist())},
                  "z": {k: e.z for k, e in evidence.items()},
                  "gain": {k: e.gain if np.isfinite(e.gain) else None for k, e in evidence.items()},
                  "audit_docs": self.pool.ids[rest[audit]].tolist(),
                  "larger": {n: [e.macro_f1, e.macro_f1_low, e.macro_f1_high] for n, e in larger.items()}}
        return picked, picked_rules, record

    def evidence(self, labelled: np.ndarray, rule_of: np.ndarray, recency: np.ndarray, rules: list[str]) -> dict:
        """``rule_evidence`` on the labels so far as ``plan_night`` calls it (the task model's C, folds, seed;
        its cap on the rows, ``task_model.cv_max_labels``, is far above a bench loop's labels)."""
        from labelnext.ops.select.bandit import rule_evidence

        tm = self.cfg.select.task_model
        assert len(labelled) <= tm.cv_max_labels
        return rule_evidence(self.pool.emb[labelled], self.pool_y[labelled], rule_of.astype(str), recency, rules,
                             fit=lambda x, y: loop.fit(x, y, tm.c),  # TaskModel.fit, warnings quiet
                             folds=tm.cv_folds, seed=tm.seed)


# -- reporting --------------------------------------------------------------------------------------------
def audit_records(results: list[loop.LoopResult], strategies: tuple[str, ...] = loop.AUDITED) -> list:
    return [r for r in results if r.strategy in strategies and r.audit]


def coverage(records: list) -> dict[str, float]:
    """Share of audited rounds whose interval holds the true held-out value (macro-F1; accuracy), the intervals'
    mean width, the estimate's mean error, and the share holding the unlabelled pool's macro-F1 (what the audit
    samples: the pool the labelled rounds left, not the test split)."""
    if not records:
        return {"n": 0}
    a = [r.audit for r in records]

    def share(key: str, low: str, high: str) -> float:
        return float(np.mean([x[low] <= x.get(key, np.nan) <= x[high] for x in a]))

    def mean(f) -> float:
        return float(np.mean([f(x) for x in a]))

    return {"n": len(a), "audit_n": mean(lambda x: x["audit_n"]), "f1": share("true_f1", "f1_low", "f1_high"),
            "f1_width": mean(lambda x: x["f1_high"] - x["f1_low"]),
            "f1_bias": mean(lambda x: x["f1_est"] - x["true_f1"]),
            "pool": share("pool_f1", "f1_low", "f1_high"), "acc": share("true_acc", "acc_low", "acc_high"),
            "acc_width": mean(lambda x: x["acc_high"] - x["acc_low"])}


def coverage_table(results: list[loop.LoopResult], names: list[str]) -> str:
    rows = []
    for label, ds in [*[(d, [d]) for d in names], ("all datasets", names)]:
        c = coverage([r for r in audit_records(results) if r.dataset in ds])
        if c["n"]:
            rows.append([label, str(c["n"]), f"{c['audit_n']:.1f}", f"{c['f1']:.1%}", f"{c['f1_width']:.3f}",
                         f"{c['f1_bias']:+.3f}", f"{c['pool']:.1%}", f"{c['acc']:.1%}", f"{c['acc_width']:.3f}"])
    return markdown_table(["dataset", "audited rounds", "audit docs", "macro-F1 coverage", "mean width",
                           "mean estimate - true", "coverage of the unlabelled pool's macro-F1",
                           "accuracy coverage (Wilson)", "mean width"], rows)


def larger_table(results: list[loop.LoopResult], names: list[str]) -> str:
    """Coverage and mean width of the product's macro-F1 interval on larger audits of the same rounds."""
    rows = []
    for label, ds in [*[(d, [d]) for d in names], ("all datasets", names)]:
        got = [r.audit for r in audit_records(results) if r.dataset in ds]
        cells = []
        for n in LARGER_AUDITS:
            at = [(x["larger"][str(n)], x["true_f1"], x["pool_f1"]) for x in got if str(n) in x.get("larger", {})]
            cells.append(f"{np.mean([lo <= t <= hi for (_, lo, hi), t, _ in at]):.1%} / "
                         f"{np.mean([hi - lo for (_, lo, hi), _, _ in at]):.3f} / "
                         f"{np.mean([f - t for (f, _, _), t, _ in at]):+.3f} / "
                         f"{np.mean([lo <= p <= hi for (_, lo, hi), _, p in at]):.1%}" if at else "-")
        if got:
            rows.append([label, *cells])
    return markdown_table(["dataset", *[f"{n} audit docs" for n in LARGER_AUDITS]], rows)


def _seeds(f1: dict, names: list[str], strategies: list[str], rnd: int) -> list[int]:
    return sorted({k[3] for k in f1 if all((d, st, rnd, k[3]) in f1 for d in names for st in strategies)})


def acceptance(results: list[loop.LoopResult], names: list[str], rnd: int, labels: int) -> str:
    """Per dataset at round ``rnd``: adaptive against each single rule and the best of them (checks), adaptive
    against the default on the mean, the audit's cost."""
    f1 = loop._index(results)
    singles = list(SINGLE_RULES.values())
    seeds = _seeds(f1, names, ["adaptive", *singles], rnd)

    def mean(st, d):
        return float(np.mean([f1[(d, st, rnd, s)] for s in seeds]))

    rows, ok_all = [], True
    for d in names:
        best = max(singles, key=lambda st: mean(st, d))
        diff, se = loop._paired(f1, [d], rnd, "adaptive", best, seeds)
        ok = diff >= -WITHIN
        ok_all &= ok
        rows.append([d, *[f"{mean(st, d):.4f}" for st in singles], f"{mean('adaptive', d):.4f}", best,
                     f"{diff:+.4f} ± {se:.4f}", loop._verdict(ok)])
    head = ["dataset", *[f"{st} ({rule})" for rule, st in SINGLE_RULES.items()], "adaptive", "best single rule",
            "adaptive - best", f"within {WITHIN:g}"]
    vs_default = loop._paired(f1, names, rnd, "adaptive", "labelnext", seeds)
    lines = [markdown_table(head, rows), "",
             f"- {labels} labels, adaptive within {WITHIN:g} macro-F1 of the best single rule on every dataset: "
             f"{loop._verdict(ok_all)}",
             f"- {labels} labels, adaptive - labelnext on the mean over datasets: {vs_default[0]:+.4f} ± "
             f"{vs_default[1]:.4f} (>= 0: {loop._verdict(vs_default[0] >= 0)})"]
    return "\n".join(lines)


def lodo_variants(results: list[loop.LoopResult], names: list[str], rounds: int, per_round: int) -> str:
    """For each held-out dataset, the variant (``VARIANTS``) with the best mean F1 over rounds 2-R on the other
    datasets, and on the held-out one its difference to labelnext and to the best single rule at round R."""
    f1 = loop._index(results)
    seeds = _seeds(f1, names, [*VARIANTS, *SINGLE_RULES.values()], rounds)

    def mean(st, ds):
        return float(np.mean([f1[(d, st, r, s)] for d in ds for r in range(2, rounds + 1) for s in seeds]))

    rows = []
    for d in names:
        others = [o for o in names if o != d]
        pick = max(VARIANTS, key=lambda v: mean(v, others))
        best = max(SINGLE_RULES.values(), key=lambda st: float(np.mean([f1[(d, st, rounds, s)] for s in seeds])))
        vs_default = loop._paired(f1, [d], rounds, pick, "labelnext", seeds)
        vs_best = loop._paired(f1, [d], rounds, pick, best, seeds)
        rows.append([d, pick, *[f"{mean(v, others):.4f}" for v in VARIANTS],
                     f"{vs_default[0]:+.4f} ± {vs_default[1]:.4f}", f"{vs_best[0]:+.4f} ± {vs_best[1]:.4f} ({best})"])
    return markdown_table(["held out", "picked on the others", *[f"{v}: others' mean F1, rounds 2-{rounds}"
                                                                for v in VARIANTS],
                           f"held out at {rounds * per_round}: pick - labelnext",
                           "pick - best single rule"], rows)


def difference_table(results: list[loop.LoopResult], names: list[str], rounds: int, per_round: int,
                     pairs: list[tuple[str, str]]) -> str:
    """Paired differences per round, averaged over datasets (± SE over seeds), and per dataset."""
    f1 = loop._index(results)
    rows = []
    for st, ref in pairs:
        seeds = _seeds(f1, names, [st, ref], 1)
        for label, ds in [("mean", names), *[(d, [d]) for d in names]]:
            cells = []
            for r in range(1, rounds + 1):
                m, se = loop._paired(f1, ds, r, st, ref, seeds)
                cells.append(f"{m:+.4f} ± {se:.4f}")
            rows.append([f"{st} - {ref}", label, *cells])
    return markdown_table(["difference", "dataset", *[f"{r * per_round} labels" for r in range(1, rounds + 1)]],
                          rows)


def shares_table(results: list[loop.LoopResult], names: list[str], per_round: int) -> str:
    """The bandit's mean share per rule and round (over seeds), all datasets and each, and the picks per rule."""
    recs = audit_records(results, ("adaptive",))
    rows = []
    for label, ds in [("all datasets", names), *[(d, [d]) for d in names]]:
        for rnd in sorted({r.round for r in recs}):
            got = [r.audit for r in recs if r.dataset in ds and r.round == rnd]
            if not got:
                continue
            rows.append([label, f"{rnd} ({(rnd - 1) * per_round} labels before)",
                         *[f"{np.mean([g['shares'][k] for g in got]):.2f}" for k in ADAPTIVE_RULES],
                         *[f"{np.mean([g['picked'].get(k, 0) for g in got]):.1f}" for k in (*ADAPTIVE_RULES, "audit")],
                         *[f"{np.mean([g['z'].get(k, 0) for g in got]):+.2f} "
                           f"({np.mean([abs(g['z'].get(k, 0)) for g in got]):.2f})" for k in ADAPTIVE_RULES]])
    return markdown_table(["datasets", "round", *[f"share {k}" for k in ADAPTIVE_RULES],
                           *[f"picked {k}" for k in (*ADAPTIVE_RULES, "audit")],
                           *[f"z {k}: mean (mean abs)" for k in ADAPTIVE_RULES]],
                          rows)


def render(results: list[loop.LoopResult], names: list[str], strategies: list[str], rounds: int,
           per_round: int) -> str:
    """The section of the loop report on the audited strategies (empty when none ran)."""
    if not set(loop.AUDITED) & set(strategies):
        return ""
    parts = ["", "## Audited, adaptive loop", "",
             "Audit coverage: each audited round's interval (macro-F1: percentile bootstrap joined with a Wilson interval at the audit's size; accuracy: Wilson; "
             "the product's `estimate` at `select.audit_confidence`) against the true held-out value of the task "
             "model the audit scored (trained on the rounds before it). Goal: macro-F1 coverage >= 90 %.", "",
             coverage_table(results, names), "",
             "The same rounds with a larger audit (the first n documents of the same draw, scored with the same "
             "model; recorded only, the loop labelled the audit above). Cells: macro-F1 coverage / mean width / "
             "mean estimate - true / coverage of the unlabelled pool's macro-F1:", "", larger_table(results, names), ""]
    if {"adaptive", *SINGLE_RULES.values()} <= set(strategies):
        # the acceptance at the last round; two rounds earlier as well, before small pools are used up
        for rnd in sorted({rounds, max(2, rounds - 2)}, reverse=True):
            parts += [f"### Adaptive against the single rules at {rnd * per_round} labels"
                      + ("" if rnd == rounds else " (supplementary)"), "",
                      acceptance(results, names, rnd, rnd * per_round), ""]
    pairs = [(a, b) for a, b in (("labelnext+audit", "labelnext"), ("adaptive", "labelnext"),
                                 ("adaptive", "labelnext+audit"), ("adaptive", "adaptive+even"),
                                 ("adaptive+lead0", "labelnext"), ("adaptive+lead2", "labelnext"))
             if {a, b} <= set(strategies)]
    if pairs:
        parts += ["### Differences, paired by seed (± SE over seeds)", "",
                  "`labelnext+audit - labelnext` is what the audit costs.", "",
                  difference_table(results, names, rounds, per_round, pairs), ""]
    if set(VARIANTS) <= set(strategies) and len(names) > 1:
        parts += ["### Variants, leave one dataset out", "",
                  "`adaptive`: the product's defaults (`select.rules_explore`, `select.rules_lead`); "
                  "`adaptive+even`: explore 1 (each rule a third of the non-audit budget whatever the evidence); "
                  "`adaptive+lead0`: explore 0.2, no incumbent (the first defaults tried); `adaptive+lead2`: "
                  "explore 0.1, the first rule (cluster_margin) 2 standard errors ahead. Picked per held-out "
                  "dataset by the mean F1 over rounds "
                  f"2-{rounds} on the other datasets:", "", lodo_variants(results, names, rounds, per_round), ""]
    if "adaptive" in strategies:
        parts += ["### The bandit's split", "",
                  "Mean share of the non-audit budget per rule, picks per rule (a rule that runs out of "
                  "candidates passes the rest on) and the evidence's z, per round:", "",
                  shares_table(results, names, per_round), ""]
    return "\n".join(parts)
