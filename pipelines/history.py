"""The label loop's history: which rule picked what on earlier nights, how the task model fared on it once
labelled, the audited learning curve, and the split of tonight's budget between ``select.rules``.

Each night's ledger entry (``pipelines/ledger.py``) records every selected id with the rule that picked it and
the task model's prediction at the time. Tonight joins the committed entries of nights dated before it with the
labels so far; that is the whole evidence, so a rerun or backfill of night N reads only what nights before N
wrote and reproduces N's selection and split. Tonight's view is written as
``OUTPUT/history/run_date=D/run_id=ID/part-<attempt>.parquet`` before the manifest, which names it: one ``night``
row per (earlier night, rule) and one ``split`` row per rule of tonight. ``labelnext history`` and report.html
read only committed nights' files.

A night whose ledger file is missing or unreadable, or a ledger folder without a committed manifest, is left out
with a counted warning; its picks then count as labels of no rule (they still train the task model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from labelnext.ops.core.columns import DOC_ID, PREDICTED_LABEL, RULE
from labelnext.ops.io import storage
from labelnext.ops.io.storage import OutputRoot, RunLayout
from labelnext.ops.select.audit import AUDIT, estimate
from labelnext.ops.select.bandit import RuleEvidence
from labelnext.pipelines import ledger
from labelnext.pipelines.ledger import RunRef

log = logging.getLogger("labelnext")

HISTORY_DIR = "history"
UNATTRIBUTED = "unattributed"  # labels of documents no committed night picked (or whose ledger was unreadable)
HISTORY_SCHEMA = pa.schema([
    ("kind", pa.string()),  # "night": an earlier night as known tonight; "split": tonight's split
    ("run_date", pa.string()), ("run_id", pa.string()), ("rule", pa.string()),
    ("picked", pa.int64()), ("labelled", pa.int64()), ("wrong", pa.int64()), ("share", pa.float64()),
    ("labels_before", pa.int64()),
    ("audit_n", pa.int64()), ("accuracy", pa.float64()), ("accuracy_low", pa.float64()),
    ("accuracy_high", pa.float64()), ("macro_f1", pa.float64()), ("macro_f1_low", pa.float64()),
    ("macro_f1_high", pa.float64()), ("confidence", pa.float64()),
    ("planned", pa.int64()), ("evidence_gain", pa.float64()), ("evidence_se", pa.float64()),
    ("evidence_z", pa.float64()), ("evidence_left_out", pa.int64()), ("evidence_audit", pa.int64()),
    ("evaluated_on", pa.string()),
])


@dataclass
class Night:
    ref: RunRef
    labels_before: Optional[int]  # labels its task model trained on (None: a cold start)
    picked: dict[str, int]  # documents each rule picked that night
    doc_ids: list[str]  # the picks that have a label (label-sized), with their rule and recorded prediction
    rules: list[str]
    predicted: list[Optional[str]]


@dataclass
class Evidence:
    """What earlier committed nights picked, by rule, and what was skipped on the way."""

    nights: list[Night] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line per night left out

    def attribution(self) -> dict[str, tuple[str, int]]:
        """doc_id -> (rule, index of the night that picked it)."""
        out = {}
        for i, night in enumerate(self.nights):
            for doc_id, rule in zip(night.doc_ids, night.rules):
                out[doc_id] = (rule, i)
        return out


def read_evidence(output: OutputRoot, current: RunRef, labelled: Optional[pa.Array] = None) -> Evidence:
    """The ledger entries of committed nights dated before ``current``: per night, the picks per rule, and the
    picks whose id is in ``labelled`` (all of them without it) with their rule and prediction. Only label-sized
    rows become Python objects; a year of nightly budgets stays in Arrow columns per file."""
    by_run = ledger.ledger_files(output)
    refs = sorted({ref for ref in (*by_run, *ledger.committed_runs(output)) if ref.run_date < current.run_date})
    evidence = Evidence()
    for ref, manifest in zip(refs, ledger.manifests(output, refs)):
        entry = (manifest or {}).get("ledger") or {}
        path = output.path(entry["path"]) if entry.get("path") else None
        if manifest is None:
            evidence.skipped.append(f"{ref.label}: a ledger entry without a committed manifest")
            continue
        if path is None:
            continue  # a run with output.ledger off: it selected nothing for later nights to judge
        if path not in by_run.get(ref, []):
            evidence.skipped.append(f"{ref.label}: the ledger file its manifest names is missing")
            continue
        try:
            with output.fs.open_input_file(path) as fh:
                table = pq.read_table(fh)
        except (OSError, pa.ArrowInvalid) as exc:
            evidence.skipped.append(f"{ref.label}: ledger file unreadable ({str(exc).splitlines()[0][:120]})")
            continue
        if DOC_ID not in table.column_names:
            evidence.skipped.append(f"{ref.label}: ledger file has no doc_id column")
            continue
        rule = (pc.fill_null(table.column(RULE).cast(pa.string()), UNATTRIBUTED) if RULE in table.column_names
                else pa.chunked_array([pa.array([UNATTRIBUTED] * table.num_rows, pa.string())]))
        picked = pc.value_counts(rule)
        if labelled is not None:
            keep = pc.is_in(table.column(DOC_ID).cast(pa.string()), value_set=labelled)
            table, rule = table.filter(keep), rule.filter(keep)
        predicted = (table.column(PREDICTED_LABEL).to_pylist() if PREDICTED_LABEL in table.column_names
                     else [None] * table.num_rows)
        task = (manifest or {}).get("task_model") or {}
        before = task.get("labels_used") if task.get("status") == "trained" else None
        evidence.nights.append(Night(ref, before, dict(zip(picked.field("values").to_pylist(),
                                                           picked.field("counts").to_pylist())),
                                     [str(d) for d in table.column(DOC_ID).to_pylist()], rule.to_pylist(), predicted))
    if evidence.skipped:
        log.warning("history: %d earlier night(s) left out of the evidence: %s", len(evidence.skipped),
                    "; ".join(evidence.skipped[:3]) + (" ..." if len(evidence.skipped) > 3 else ""))
    return evidence


def night_rows(evidence: Evidence, labels: dict[str, str], confidence: float, seed: int,
               evaluated_on: str) -> list[dict[str, Any]]:
    """Per earlier night and rule: picked, labelled, how often the night's task model was wrong on them; on the
    audit rows also its audited accuracy and macro-F1 with their intervals."""
    rows = []
    for night in evidence.nights:
        by_rule: dict[str, list[int]] = {rule: [] for rule in night.picked}
        for i, rule in enumerate(night.rules):
            by_rule[rule].append(i)
        active = sum(n for r, n in night.picked.items() if r != AUDIT)
        for rule, idx in by_rule.items():
            got = [i for i in idx if night.doc_ids[i] in labels]
            judged = [i for i in got if night.predicted[i] is not None]
            truth = [labels[night.doc_ids[i]] for i in judged]
            guess = [str(night.predicted[i]) for i in judged]
            row = {"kind": "night", "run_date": night.ref.run_date, "run_id": night.ref.run_id, "rule": rule,
                   "picked": night.picked[rule], "labelled": len(got),
                   "wrong": int(sum(t != g for t, g in zip(truth, guess))) if judged else None,
                   "share": night.picked[rule] / active if rule != AUDIT and active else None,
                   "labels_before": night.labels_before, "evaluated_on": evaluated_on}
            if rule == AUDIT and judged:
                est = estimate(truth, guess, confidence=confidence, seed=seed)
                row.update(audit_n=est.n, accuracy=est.accuracy, accuracy_low=est.accuracy_low,
                           accuracy_high=est.accuracy_high, macro_f1=est.macro_f1, macro_f1_low=est.macro_f1_low,
                           macro_f1_high=est.macro_f1_high, confidence=est.confidence)
            rows.append(row)
    return rows


def split_rows(ref: RunRef, shares: dict[str, float], planned: dict[str, int],
               evidence: dict[str, RuleEvidence], evaluated_on: str) -> list[dict[str, Any]]:
    rows = []
    for rule, share in shares.items():
        ev = evidence.get(rule)
        rows.append({"kind": "split", "run_date": ref.run_date, "run_id": ref.run_id, "rule": rule, "share": share,
                     "planned": planned.get(rule), "labelled": ev.labels if ev else None,
                     "evidence_gain": ev.gain if ev else None, "evidence_se": ev.se if ev else None,
                     "evidence_z": ev.z if ev else None, "evidence_left_out": ev.left_out if ev else None,
                     "evidence_audit": ev.audit if ev else None, "evaluated_on": evaluated_on})
    return rows


def as_table(rows: list[dict[str, Any]]) -> pa.Table:
    def clean(v):
        return None if isinstance(v, float) and not np.isfinite(v) else v

    return pa.Table.from_pylist([{k: clean(r.get(k)) for k in HISTORY_SCHEMA.names} for r in rows],
                                schema=HISTORY_SCHEMA)


# -- the night's entry: written before the manifest, trusted only when the manifest names it ---------------
def entry_dir(layout: RunLayout) -> str:
    return layout.output.path(f"{HISTORY_DIR}/{layout.label}")


def write_entry(layout: RunLayout, table: pa.Table, attempt: str) -> dict[str, Any]:
    path = f"{entry_dir(layout)}/part-{attempt}.parquet"
    storage.write_parquet(layout.fs, path, table)
    return storage.file_entry(layout.fs, path, path[len(layout.output.root) + 1:])


def delete_entry(layout: RunLayout) -> None:
    layout.objects.delete_prefix(entry_dir(layout))


@dataclass
class CommittedHistory:
    """The latest committed night's history and each committed night's own split, as ``labelnext history`` and
    report.html show them."""

    nights: pa.Table  # kind == night rows of the latest readable history file
    splits: pa.Table  # kind == split rows of every committed night with a readable file
    latest: Optional[RunRef]
    skipped: list[str] = field(default_factory=list)


def read_committed(output: OutputRoot) -> CommittedHistory:
    """Every committed night's history file (named by its manifest); unreadable ones are skipped and counted."""
    refs = sorted(ledger.committed_runs(output))
    tables: list[tuple[RunRef, pa.Table]] = []
    skipped = []
    for ref, manifest in zip(refs, ledger.manifests(output, refs)):
        entry = (manifest or {}).get("history") or {}
        if not entry.get("path"):
            continue  # a night without a task model or from before the history existed
        try:
            with output.fs.open_input_file(output.path(entry["path"])) as fh:
                table = pq.read_table(fh).select(HISTORY_SCHEMA.names).cast(HISTORY_SCHEMA)
        except (OSError, pa.ArrowInvalid, KeyError, ValueError) as exc:
            skipped.append(f"{ref.label}: history file unreadable ({str(exc).splitlines()[0][:120]})")
            continue
        tables.append((ref, table))
    if skipped:
        log.warning("history: %d night(s) skipped: %s", len(skipped), "; ".join(skipped[:3]))
    empty = HISTORY_SCHEMA.empty_table()
    if not tables:
        return CommittedHistory(empty, empty, None, skipped)
    latest, table = tables[-1]
    nights = table.filter(pa.compute.equal(table.column("kind"), "night"))
    splits = pa.concat_tables([t.filter(pa.compute.equal(t.column("kind"), "split")) for _, t in tables])
    return CommittedHistory(nights, splits, latest, skipped)
