"""``labelnext history OUTPUT``: the label loop's learning curve and the rules' shares, night by night, from
committed nights only (``pipelines/history.py``)."""

from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from labelnext.ops.io.storage import OutputRoot
from labelnext.ops.select.audit import AUDIT
from labelnext.pipelines.config import StorageConfig
from labelnext.pipelines.history import CommittedHistory, read_committed


def load_history(output_uri: str, storage_cfg: Optional[StorageConfig] = None) -> CommittedHistory:
    return read_committed(OutputRoot.open(output_uri.rstrip("/"), storage_cfg or StorageConfig()))


def nights_view(hist: CommittedHistory) -> list[dict[str, Any]]:
    """One row per night: the labels its model trained on, its audited accuracy and macro-F1 (as the latest
    committed night knows them), and what each rule picked that night."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in hist.nights.to_pylist():
        row = rows.setdefault((r["run_date"], r["run_id"]), {"run_date": r["run_date"], "run_id": r["run_id"],
                                                             "labels_before": r["labels_before"], "picked": {}})
        row["picked"][r["rule"]] = r["picked"]
        if r["rule"] == AUDIT and r["audit_n"]:
            row["audit"] = {k: r[k] for k in ("audit_n", "accuracy", "accuracy_low", "accuracy_high", "macro_f1",
                                              "macro_f1_low", "macro_f1_high", "confidence")}
    return [rows[k] for k in sorted(rows)]


def _interval(value, low, high) -> str:
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if value is not None else "-"


def print_history(hist: CommittedHistory, console: Console, output: str = "") -> None:
    if not console.is_terminal:  # a pipe or a file: whole rows rather than 80-column wraps
        console = Console(file=console.file, width=max(console.width, 160))
    if hist.latest is None:
        console.print(f"{output or 'this output'}: no committed night has a history yet (it starts with the first "
                      "night run with --labels)", highlight=False, soft_wrap=True)
        return
    nights = nights_view(hist)
    rules = sorted({rule for n in nights for rule in n["picked"] if rule != AUDIT})
    table = Table(title=f"label loop, as judged on {hist.latest.run_date} ({hist.latest.run_id})")
    for name in ("night", "labels before", "audited", "accuracy", "macro-F1", *[f"{r}" for r in rules]):
        table.add_column(name, justify="left" if name == "night" else "right")
    for n in nights:
        a = n.get("audit") or {}
        active = sum(v for r, v in n["picked"].items() if r != AUDIT) or 1
        table.add_row(f"{n['run_date']} {n['run_id']}", str(n["labels_before"] if n["labels_before"] is not None
                                                           else "cold start"),
                      f"{a['audit_n']}/{n['picked'].get(AUDIT, 0)}" if a else str(n["picked"].get(AUDIT, 0)),
                      _interval(a.get("accuracy"), a.get("accuracy_low"), a.get("accuracy_high")),
                      _interval(a.get("macro_f1"), a.get("macro_f1_low"), a.get("macro_f1_high")),
                      *[f"{n['picked'].get(r, 0)} ({n['picked'].get(r, 0) / active:.0%})" for r in rules])
    console.print(table)
    latest = hist.splits.filter(pa.compute.equal(hist.splits.column("run_id"), hist.latest.run_id))
    if latest.num_rows:
        split = Table(title=f"split of {hist.latest.run_date} ({hist.latest.run_id})")
        for name in ("rule", "share", "planned", "labelled picks", "evidence (z)"):
            split.add_column(name, justify="left" if name == "rule" else "right")
        for r in latest.to_pylist():
            split.add_row(r["rule"], f"{r['share']:.0%}", str(r["planned"] if r["planned"] is not None else "-"),
                          str(r["labelled"] if r["labelled"] is not None else "-"),
                          f"{r['evidence_z']:+.2f}" if r["evidence_z"] is not None else "-")
        console.print(split)
    if hist.skipped:
        console.print(f"skipped {len(hist.skipped)} night(s) with an unreadable history file: "
                      + "; ".join(hist.skipped[:3]), highlight=False, soft_wrap=True)
