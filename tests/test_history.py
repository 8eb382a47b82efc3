"""The label loop's evidence from earlier nights' ledger entries: what each rule picked and how the night's model
fared on it, ledger entries written before rules were recorded, and what is left out (with a count)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labelnext.ops.io.storage import OutputRoot
from labelnext.pipelines.config import StorageConfig
from labelnext.pipelines.history import UNATTRIBUTED, night_rows, read_evidence
from labelnext.pipelines.ledger import RunRef


def commit_night(root, run_date: str, run_id: str, ledger: pa.Table | None, labels_used: int | None = None,
                 manifest: bool = True) -> None:
    entry = f"ledger/run_date={run_date}/run_id={run_id}/part-a.parquet"
    if ledger is not None:
        (root / entry).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(ledger, root / entry)
    if manifest:
        run = root / f"run_date={run_date}" / f"run_id={run_id}"
        run.mkdir(parents=True, exist_ok=True)
        task = {"status": "trained", "labels_used": labels_used} if labels_used else None
        (run / "manifest.json").write_text(json.dumps({"ledger": {"path": entry}, "task_model": task}))


@pytest.fixture
def output(tmp_path):
    commit_night(tmp_path, "2026-11-01", "old", pa.table({"doc_id": ["o1", "o2"]}))  # before rules were recorded
    commit_night(tmp_path, "2026-11-02", "n", pa.table({
        "doc_id": ["a1", "a2", "c1", "c2", "m1"], "rule": ["audit", "audit", "cluster_margin", "cluster_margin", "margin"],
        "predicted_label": ["x", "y", "x", "x", "y"]}), labels_used=40)
    commit_night(tmp_path, "2026-11-03", "crashed", pa.table({"doc_id": ["z"]}), manifest=False)
    commit_night(tmp_path, "2026-11-03", "lost", None)  # the manifest names a ledger file that is gone
    commit_night(tmp_path, "2026-11-05", "later", pa.table({"doc_id": ["l1"], "rule": ["margin"],
                                                            "predicted_label": ["x"]}), labels_used=50)
    return OutputRoot.open(str(tmp_path), StorageConfig())


def test_evidence_reads_only_earlier_committed_nights_and_counts_what_it_leaves_out(output, caplog):
    evidence = read_evidence(output, RunRef("2026-11-04", "tonight"))
    assert [n.ref.run_id for n in evidence.nights] == ["old", "n"]  # not the later night
    assert len(evidence.skipped) == 2 and "crashed" in evidence.skipped[0] + evidence.skipped[1]
    assert "history: 2 earlier night(s) left out of the evidence" in caplog.text
    old, night = evidence.nights
    assert old.rules == [UNATTRIBUTED] * 2 and old.predicted == [None, None] and old.labels_before is None
    assert night.labels_before == 40
    assert evidence.attribution()["m1"] == ("margin", 1)


def test_night_rows_judge_each_rule_on_its_labelled_picks(output):
    evidence = read_evidence(output, RunRef("2026-11-04", "tonight"))
    labels = {"a1": "x", "a2": "x", "c1": "y", "m1": "y", "o1": "x"}
    rows = {(r["run_id"], r["rule"]): r for r in night_rows(evidence, labels, 0.95, 0, "2026-11-04")}
    audit = rows[("n", "audit")]
    assert (audit["picked"], audit["labelled"], audit["wrong"], audit["audit_n"]) == (2, 2, 1, 2)
    assert audit["accuracy"] == 0.5 and audit["accuracy_low"] < 0.5 < audit["accuracy_high"]
    cm = rows[("n", "cluster_margin")]
    assert (cm["picked"], cm["labelled"], cm["wrong"], cm["share"]) == (2, 1, 1, pytest.approx(2 / 3))
    assert rows[("n", "margin")]["wrong"] == 0
    old = rows[("old", UNATTRIBUTED)]
    assert (old["picked"], old["labelled"], old["wrong"]) == (2, 1, None)  # no prediction recorded: not judged
    assert all(r["evaluated_on"] == "2026-11-04" for r in rows.values())
    only_labelled = read_evidence(output, RunRef("2026-11-04", "tonight"), pa.array(list(labels)))
    assert sum(len(n.doc_ids) for n in only_labelled.nights) == 5  # label-sized, the picks counted all the same
    assert night_rows(only_labelled, labels, 0.95, 0, "2026-11-04") == list(rows.values())
