"""A night's selection with a task model: the audit sample first, then each of ``select.rules`` its share.

The rules pick one after another from the candidates the earlier ones left, each with its own settings of the
``Selector``; a rule that cannot fill its count passes the rest to the next. Every row records the rule that
picked it (``rule``), so the next nights can tell which rule's labels taught the task model what.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labelnext.ops.core.columns import DOC_ID, MARGIN, PREDICTED_LABEL, RULE
from labelnext.ops.select.audit import AUDIT
from labelnext.ops.select.selector import SelectConfig, Selector

RULE_REASONS = {AUDIT: "audit_uniform_sample"}


def rule_settings(cfg: SelectConfig, rule: str) -> SelectConfig:
    """The ``Selector`` settings a rule picks with (``coverage`` also drops the margin, see ``select_split``)."""
    if rule == "margin":  # the lowest margins, clusters and distance ignored
        return cfg.model_copy(update={"rule": "entropy_only", "margin_distance_weight": 0.0,
                                      "llm_with_labels": False, "llm_disagreement": 0.0})
    if rule == "coverage":  # the document nearest each centroid, one per cluster first, as a cold start does
        return cfg.model_copy(update={"rule": "cluster_only", "quota": "cover"})
    if rule == "llm":  # Cluster-Margin with the task-aware LLM's entropy on near-ties and its disagreement
        return cfg.model_copy(update={"llm_with_labels": True, "llm_disagreement": cfg.llm_disagreement or 0.1})
    return cfg


def audit_rows(audit: pa.Table, sizes: np.ndarray) -> pa.Table:
    """The audit documents in the selection's columns (rule ``audit``), in their draw order."""
    return Selector._output(audit, np.arange(audit.num_rows, dtype=np.int64),
                            [RULE_REASONS[AUDIT]] * audit.num_rows, sizes, AUDIT)


def select_split(candidates: pa.Table, sizes: np.ndarray, counts: dict[str, int], cfg: SelectConfig,
                 label_counts: Optional[dict[str, int]] = None, audit: Optional[pa.Table] = None) -> pa.Table:
    """The audit rows, then each rule's ``counts`` picks from the candidates not yet taken; ranks run over all."""
    parts = [audit_rows(audit, sizes)] if audit is not None and audit.num_rows else []
    taken = pa.concat_tables(parts).column(DOC_ID) if parts else pa.chunked_array([], pa.string())
    carry = 0
    for rule, count in counts.items():
        want = count + carry
        left = candidates.filter(pc.invert(pc.is_in(candidates.column(DOC_ID), value_set=taken.combine_chunks())))
        if want <= 0 or left.num_rows == 0:
            carry = want
            continue
        pool = left.drop_columns([MARGIN]) if rule == "coverage" and MARGIN in left.column_names else left
        picked = Selector(rule_settings(cfg, rule), label_counts=label_counts, rule=rule).select(pool, sizes, want)
        if rule == "coverage" and MARGIN in left.column_names:
            picked = _with_margin(picked, left)
        parts.append(picked)
        taken = pa.chunked_array([*taken.chunks, *picked.column(DOC_ID).chunks], pa.string())
        carry = want - picked.num_rows
    if not parts:
        return Selector(cfg, label_counts=label_counts).select(candidates, sizes, 0)
    out = pa.concat_tables(parts, promote_options="default")
    return out.set_column(out.column_names.index("rank"), "rank",
                          pa.array(np.arange(1, out.num_rows + 1, dtype=np.int32)))


def _with_margin(picked: pa.Table, source: pa.Table) -> pa.Table:
    where = pc.index_in(picked.column(DOC_ID), value_set=source.column(DOC_ID).combine_chunks())
    for name in (MARGIN, PREDICTED_LABEL):
        if name in source.column_names:
            values = source.column(name).combine_chunks().take(where).cast(picked.schema.field(name).type)
            picked = picked.set_column(picked.column_names.index(name), name, values)
    return picked


def rules_picked(selected: pa.Table) -> dict[str, int]:
    """Selected documents per rule, in the order they appear."""
    if RULE not in selected.column_names:
        return {}
    out: dict[str, int] = {}
    for rule in selected.column(RULE).to_pylist():
        out[rule] = out.get(rule, 0) + 1
    return out
