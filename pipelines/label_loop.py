"""The nightly label loop (``input.labels``) of a run: the labels so far, the labelled documents' vectors, the
task model trained on them, and its record for the manifest.

:class:`LabelLoop` holds the loop's state for one run; :class:`~labelnext.pipelines.selection.SelectionPipeline`
calls it between its stages. Without labels every method is a no-op and the run is a cold start.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labelnext.ops.core.columns import DOC_ID, EMBEDDING, ID_HASH, MARGIN, PREDICTED_LABEL, TEXT, TEXT_HASH
from labelnext.ops.core.instrument import ACTOR_ID, BUSY_S, NODE_ID
from labelnext.ops.select.audit import audit_salt
from labelnext.ops.select.split import rules_picked, select_split
from labelnext.ops.embed.cache import EmbeddingCache, add_text_hash
from labelnext.ops.io import labels as lb
from labelnext.ops.io import read as rd
from labelnext.ops.io.storage import RunLayout
from labelnext.ops.select import selector as sel
from labelnext.ops.select.task_model import TaskModel, cross_validated_accuracy
from labelnext.pipelines import dataflow as flow
from labelnext.pipelines import history
from labelnext.pipelines.commit import RunWriter
from labelnext.pipelines.config import RunConfig
from labelnext.pipelines.cost import CostLedger
from labelnext.pipelines.embed_stage import embed_pool
from labelnext.pipelines.ledger import RunRef
from labelnext.pipelines.loop_plan import LoopPlan, plan_night
from labelnext.pipelines.placement import Placement

log = logging.getLogger("labelnext")

TASK_MODEL_FILE = "task_model.parquet"


class LabelLoop:
    def __init__(self, cfg: RunConfig, layout: RunLayout, ledger: CostLedger, counts: dict[str, int]):
        self.cfg = cfg
        self.layout = layout
        self.ledger = ledger
        self.counts = counts  # the run's counts, shared with the pipeline
        self.labels: Optional[lb.LabelSet] = None  # None on a cold start
        self.labelled_rows = None  # labelled documents of tonight's corpus (held back from the selection)
        self.info: Optional[dict[str, Any]] = None  # the task model's record for the manifest
        self.plan: Optional[LoopPlan] = None  # tonight's split between select.rules and the audit's size
        self.audit: Optional[pa.Table] = None  # tonight's audit sample (rows of the assigned dataset)

    def read_labels(self) -> Optional[lb.LabelSet]:
        """The labels so far, one row per labelled document (driver-side, like the ledger's ids)."""
        cfg = self.cfg.input
        if not cfg.labels:
            return None
        labels = lb.read_labels(cfg.labels, cfg.label_id_column, cfg.label_column, self.cfg.storage)
        for note in labels.notes:
            log.warning("labels: %s", note)
        log.info("labels: %d labelled documents from %d files (%d rows; skipped: %d null, %d superseded "
                 "duplicates)", len(labels), labels.files, labels.rows, labels.null_labels, labels.duplicate_labels)
        self.labels = labels
        return labels

    def hashes(self) -> Optional[np.ndarray]:
        """The labelled documents' id hashes (they are never selected again), or None without labels."""
        return self.labels.hashes() if self.labels is not None and len(self.labels) else None

    def label_counts(self) -> Optional[dict[str, int]]:
        return self.labels.counts() if self.labels is not None else None

    def hold_labelled(self, accepted) -> None:
        """Keep tonight's labelled documents aside before they are excluded: the task model needs their vectors."""
        import ray

        if self.labels is None or not len(self.labels):
            return
        columns = [DOC_ID, TEXT, ID_HASH, *([EMBEDDING] if self.cfg.input.embedding_column else [])]
        self.labelled_rows = accepted.select_columns(columns).map_batches(  # lazy: read once, by _label_vectors
            lb.keep_ids, fn_kwargs={"hashes": ray.put(self.labels.hashes())}, batch_format="pyarrow")

    def task_model(self, placement: Placement) -> Optional[TaskModel]:
        """The labelled documents' vectors, the task model trained on them, and its record for the manifest.

        None, and a cold start, without labels or when the labels that have a vector cover fewer than two classes.
        """
        labels = self.labels
        if labels is None:
            return None
        cfg = self.cfg.select.task_model
        vectors, sources = self._label_vectors(placement) if len(labels) else ({}, {})
        model, accuracy, folds = None, None, 0
        with self.ledger.stage("select", cpus=1, what="task model") as st:
            train = lb.training_set(labels, vectors, cfg.max_labels, cfg.seed)
            classes = np.unique(train.y)
            if classes.size >= 2:
                model = TaskModel.fit(train.x, train.y, c=cfg.c)
                accuracy, folds = cross_validated_accuracy(train.x, train.y, cfg)
            self.plan = plan_night(self.cfg, self.layout.output, RunRef(self.layout.run_date, self.layout.run_id),
                                   labels, train if model is not None else None)
        st.extra["task_model_s"] = round(st.wall_s, 3)
        self.counts.update(label_rows=labels.rows, null_labels=labels.null_labels,
                           duplicate_labels=labels.duplicate_labels, labelled_docs=len(labels),
                           labels_without_embedding=train.without_embedding, labels_used=len(train.y))
        self.info = {**labels.summary(), "labels_used": len(train.y),
                     "labels_without_embedding": train.without_embedding, "vectors_from": sources,
                     "classes": classes.tolist(), "cv_accuracy": accuracy, "cv_folds": folds}
        if model is None:
            self.info["status"] = (f"not trained: the labels with a vector cover {classes.size} class(es), "
                                   "a task model needs 2; this run is a cold start")
            log.warning("task model: %s", self.info["status"])
            return None
        self.info["status"] = "trained"
        self.info["llm_scoring"] = self.llm_decision()
        if self.llm_skipped():
            self.ledger.stages["score"].extra["skipped"] = self.info["llm_scoring"]
        log.info("task model: %d classes from %d labels (%d without a vector), cross-validated accuracy %s",
                 classes.size, len(train.y), train.without_embedding,
                 f"{accuracy:.3f} ({folds} folds)" if accuracy is not None else no_accuracy_reason(train.y))
        return model

    def draw_audit(self, assigned, budget: int, candidates: pa.Table) -> pa.Table:
        """Draw tonight's audit sample (``select.audit_share`` of the budget, uniform over every eligible
        document) and return the candidates without it."""
        n = self.plan.audit_size(budget) if self.plan is not None else 0
        if n == 0:
            return candidates
        columns = [c for c in flow.columns_of(assigned) if c not in {TEXT, NODE_ID, BUSY_S, ACTOR_ID}]
        self.audit = flow.audit_sample(assigned, n, audit_salt(self.cfg.select.seed, self.layout.run_date), columns)
        log.info("select: %d audit documents, a uniform sample of the %d eligible (select.audit_share %g)",
                 self.audit.num_rows, self.counts.get("accepted_docs", 0), self.cfg.select.audit_share)
        if not candidates.num_rows or not self.audit.num_rows:
            return candidates
        return candidates.filter(pc.invert(pc.is_in(candidates.column(DOC_ID), value_set=self.audit.column(DOC_ID))))

    def select(self, scored: pa.Table, sizes: np.ndarray, budget: int) -> pa.Table:
        """The selection: with a task model the audit sample and each of ``select.rules`` its share
        (``ops/select/split.py``); on a cold start ``select.rule`` alone."""
        selector = sel.Selector(self.cfg.select, label_counts=self.label_counts())
        if self.plan is None or MARGIN not in scored.column_names:
            return selector.select(scored, sizes, budget)
        audit = self.audit if self.audit is not None and self.audit.num_rows else None
        counts = self.plan.counts(budget - (audit.num_rows if audit is not None else 0))
        return select_split(scored, sizes, counts, self.cfg.select, self.label_counts(), audit)

    def history_table(self) -> Optional[pa.Table]:
        """Tonight's history entry: the earlier nights as the labels judge them and tonight's split."""
        if self.plan is None:
            return None
        ref = RunRef(self.layout.run_date, self.layout.run_id)
        split = history.split_rows(ref, self.plan.shares, self.plan.planned, self.plan.evidence,
                                   ref.run_date) if self.plan.planned else []
        return history.as_table([*self.plan.nights, *split])

    def wants_llm(self) -> bool:
        """Whether the score stage runs: on a cold start when the rule reads the LLM; with a task model only
        when ``select.llm_with_labels`` asks for it or ``select.rules`` has the llm rule."""
        cfg = self.cfg.select
        if self.info is not None and self.info.get("status") == "trained":
            return (sel.uses_llm(cfg) and cfg.llm_with_labels) or "llm" in cfg.rules
        return sel.uses_llm(cfg)

    def record(self, writer: RunWriter, task: Optional[TaskModel], selected: pa.Table) -> None:
        """Save the task model next to the run's outputs; note the selection's predicted labels and rules."""
        if self.info is None:
            return
        self.info["selected_predicted_counts"] = lb.label_counts(selected.column(PREDICTED_LABEL))
        self.info["selected_by_rule"] = rules_picked(selected)
        if self.plan is not None:
            self.info["loop"] = self.plan.summary()
        if task is not None:
            writer.write_table(TASK_MODEL_FILE, task.to_table())
            self.info["file"] = TASK_MODEL_FILE

    def score_settings(self, score):
        """``score``, with the classes of ``input.labels`` as the task prompt's choices when it names none."""
        task, counts = score.task, self.label_counts()
        if not task.prompted or task.choices is not None or not counts or len(counts) < 2:
            return score
        log.info("score: the task prompt's choices are the %d classes of input.labels", len(counts))
        return score.model_copy(update={"task": task.model_copy(update={"choices": sorted(counts)})})

    def llm_decision(self) -> str:
        if "llm" in self.cfg.select.rules:
            return "on: select.rules has the llm rule (its choice entropy and disagreement rank its share)"
        if not sel.uses_llm(self.cfg.select):
            return f"off: select.rule {self.cfg.select.rule} scores nothing"
        if self.cfg.select.llm_with_labels:
            return "on: select.llm_with_labels is true (the LLM's entropy breaks near-ties of the margin)"
        return ("skipped: labels exist and select.llm_with_labels is false; the task model's margin ranks the "
                "candidates, and neither the LLM's entropy nor a probe on its hidden states added to it on the "
                "label-loop benchmark (bench/quality.py --rounds)")

    def llm_skipped(self) -> bool:
        info = self.info
        return info is not None and info.get("status") == "trained" and not self.wants_llm()

    def _label_vectors(self, placement: Placement) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Vectors of the labelled documents (label-sized on the driver) and how many came from where.

        Tonight's labelled documents take their cached vector when the cache holds the same text, else they
        are embedded now (and cached); documents of earlier nights take theirs from the embedding cache. With
        ``input.embedding_column`` tonight's documents bring their own vectors.
        """
        import ray

        if self.cfg.input.embedding_column and self.labelled_rows is not None:
            given = lb.collect_columns(self.labelled_rows.select_columns([DOC_ID, EMBEDDING]).map_batches(
                flow.as_embedded, batch_format="numpy").iter_batches(batch_format="numpy"), (DOC_ID, EMBEDDING))
            return dict(zip(given[DOC_ID], given[EMBEDDING])), {"tonight_given": len(given[DOC_ID])}
        cache = EmbeddingCache(self.layout.output, self.cfg.embed) if self.cfg.embed.cache else None
        files = cache.files() if cache is not None else []
        cached: dict[str, Any] = {DOC_ID: [], "text_hash": [], EMBEDDING: np.zeros((0, 0), np.float32)}
        if files:
            rows = ray.data.read_parquet(files, filesystem=cache.fs, columns=[DOC_ID, "text_hash", EMBEDDING],
                                         partitioning=None).map_batches(
                lb.keep_ids, fn_kwargs={"hashes": ray.put(self.labels.hashes())}, batch_format="pyarrow")
            cached = lb.collect_columns(rows.iter_batches(batch_format="numpy"), (DOC_ID, "text_hash", EMBEDDING))
        tonight = keys = None
        if self.labelled_rows is not None:
            tonight = self.labelled_rows.map_batches(add_text_hash, batch_format="pyarrow").materialize()
            keys = lb.collect_columns(tonight.select_columns([DOC_ID, TEXT_HASH]).iter_batches(batch_format="numpy"),
                                      (DOC_ID, TEXT_HASH))
        keys = keys or {DOC_ID: [], TEXT_HASH: []}
        vectors, todo = lb.match_vectors((keys[DOC_ID], keys[TEXT_HASH]),
                                         (cached[DOC_ID], cached["text_hash"], cached[EMBEDDING]))
        log.info("labels: %d labelled documents in tonight's corpus, %d vectors from the embedding cache, %d to "
                 "embed", len(keys[DOC_ID]), len(vectors), len(todo))
        if todo:
            p = placement.embed
            with self.ledger.stage("embed", cpus=p.num_cpus * p.concurrency, gpus=p.num_gpus * p.concurrency,
                                   what="labels: embedding") as st:
                rows = tonight.map_batches(lb.keep_ids, fn_kwargs={"hashes": np.unique(rd.id_hash(todo))},
                                           batch_format="pyarrow")
                rows = rows.select_columns([DOC_ID, TEXT, TEXT_HASH] if cache is not None else [DOC_ID, TEXT])
                fresh = lb.collect_columns(embed_pool(rows, self.cfg.embed, p, cache).select_columns(
                    [DOC_ID, EMBEDDING]).iter_batches(batch_format="numpy"), (DOC_ID, EMBEDDING))
                vectors.update(zip(fresh[DOC_ID], fresh[EMBEDDING]))
                st.docs += len(fresh[DOC_ID])
                st.extra["labelled_embedded"] = len(fresh[DOC_ID])
        tonight_ids = set(keys[DOC_ID])
        return vectors, {"tonight_cached": len(tonight_ids) - len(todo), "tonight_embedded": len(todo),
                         "earlier_cache": sum(1 for d in vectors if d not in tonight_ids)}


def no_accuracy_reason(y: np.ndarray) -> str:
    """Why the task model has no cross-validated accuracy: stratified folds need two labels of every class."""
    classes, per_class = np.unique(np.asarray(y).astype(str), return_counts=True)
    single = classes[per_class < 2]
    if not single.size:  # the cross-validation's seeded sample (select.task_model.cv_max_labels) left one
        return "n/a (the cross-validation's label sample holds a single label of a class)"
    named = ", ".join(repr(str(c)) for c in single[:3]) + (f" and {single.size - 3} more" if single.size > 3 else "")
    return (f"n/a: class{'es' if single.size > 1 else ''} {named} {'have' if single.size > 1 else 'has'} a single "
            "label, and each fold needs two of every class")


def selection_rule(cfg: sel.SelectConfig, columns: list[str]) -> str:
    """The rule that chooses the selection: with a task model its margin ranks, whatever ``select.rule`` says."""
    if MARGIN not in columns:
        return f"rule {cfg.rule}"
    audit = f"; first a uniform audit sample of select.audit_share {cfg.audit_share:g}" if cfg.audit_share else ""
    if cfg.rules != ["cluster_margin"]:
        return f"select.rules {', '.join(cfg.rules)} over the task model's margin, split by the audit's evidence{audit}"
    entropy = " and the LLM's entropy on near-ties" if cfg.llm_with_labels and "uncertainty" in columns else ""
    if cfg.rule in ("entropy_only", "round_robin"):
        return f"rule {cfg.rule} over the task model's margin{entropy}{audit}"
    return (f"Cluster-Margin: the task model's margin{entropy} within cluster quotas "
            f"(select.labels_quota {cfg.labels_quota}); select.rule {cfg.rule} applies to cold starts{audit}")
