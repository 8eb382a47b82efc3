"""The audited, adaptive label loop over four nights, through the CLI, against a real S3 endpoint (moto's server).

Night one is a cold start. Nights two and three run with the labels of every earlier selection fed back and three
rules configured: each draws an audit sample and splits the rest between the rules, and each writes the history
(the earlier nights as the labels judge them, and its own split). Night four and ``labelnext history`` read it. A
backfill of night two after night three, given night two's labels, reproduces night two's selection and split.
A corrupt ledger file, a ledger folder without a manifest and a corrupt history file are each skipped with a
counted warning, never a crash.

The corpus brings its own vectors (``input.embedding_column``: topic centres plus noise, deterministic), so the
test measures the loop's plumbing, not the encoder.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from labelnext.ops.select.audit import AUDIT
from labelnext.pipelines.sample_corpus import make_documents
from tests.cli_run import QUICK
from tests.s3_fixtures import S3Bucket, s3_endpoint  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

N_DOCS, BUDGET, BUCKET = 240, 20, "loophistory"
RULES = "[cluster_margin, margin, coverage]"
NIGHTS = ("2026-11-24", "2026-11-25", "2026-11-26", "2026-11-27")
LOOP = ("--budget", str(BUDGET), "--run-id", "nightly", *QUICK, "--set", "input.embedding_column=vec",
        "--set", f"select.rules={RULES}", "--set", "select.audit_share=0.25", "--set", "cluster.k=8")


class World(S3Bucket):
    def __init__(self, endpoint: str):
        super().__init__(endpoint, BUCKET)

    def night(self, i: int, labels: str | None = None):
        extra = ("--labels", uri(labels)) if labels else ()
        return self.cli("run", "--corpus", uri("corpus/"), "--output", uri("out"), "--run-date", NIGHTS[i],
                        *LOOP, *extra)

    def manifest(self, i: int) -> dict:
        return self.json(f"out/run_date={NIGHTS[i]}/run_id=nightly/manifest.json")

    def selected(self, i: int) -> pa.Table:
        files = self.manifest(i)["files"]
        key = next(f["path"] for f in files if f["path"].startswith("selected/"))
        return self.table(f"out/run_date={NIGHTS[i]}/run_id=nightly/{key}")

    def history(self, i: int) -> pa.Table:
        return self.table(f"out/{self.manifest(i)['history']['path']}")


def uri(key: str) -> str:
    return f"s3://{BUCKET}/{key}"


def corpus() -> pa.Table:
    docs = make_documents(N_DOCS, seed=3)
    topics = docs.column("topic").to_pylist()
    rng = np.random.default_rng(0)
    centres = {t: rng.normal(size=384) for t in sorted(set(topics))}
    vecs = np.stack([centres[t] + 1.5 * rng.normal(size=384) for t in topics]).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return docs.append_column("vec", pa.array(vecs.tolist(), pa.list_(pa.float32())))


@pytest.fixture(scope="module")
def loop(s3_endpoint):
    world = World(s3_endpoint)
    docs = corpus()
    world.put("corpus/part-0.parquet", docs)
    topic = dict(zip(docs.column("id").to_pylist(), docs.column("topic").to_pylist()))
    runs, labelled = [], {}
    for i in range(4):
        prefix = f"labels-{i}/" if i else None
        runs.append(world.night(i, prefix))
        assert runs[-1].returncode == 0, runs[-1].stderr[-3000:]
        picked = world.selected(i).column("doc_id").to_pylist()
        labelled[i] = {d: topic[d] for d in picked if topic[d] is not None}
        # the labels of nights 0..i, as annotators returned them, for the night after
        for j in range(i + 1):
            world.put(f"labels-{i + 1}/night-{j}.parquet",
                      pa.table({"doc_id": list(labelled[j]), "label": list(labelled[j].values())}))
    return {"world": world, "runs": runs, "topic": topic}


def test_nights_with_a_task_model_draw_an_audit_and_split_the_rest_between_the_rules(loop):
    world = loop["world"]
    for run in loop["runs"]:  # nothing to act on: no warning, and report.html gathered its selection view
        assert not re.findall(r"^.*\bWARNING\b.*$", run.stderr, re.M), run.stderr[-3000:]
    assert "split by the audit's evidence; first a uniform audit sample" in loop["runs"][2].stderr
    night1 = world.selected(0)
    assert set(night1.column("rule").to_pylist()) == {"cold_start"}  # no task model to audit yet
    for i in (1, 2, 3):
        sel = world.selected(i)
        rules = sel.column("rule").to_pylist()
        assert rules[: BUDGET // 4] == [AUDIT] * (BUDGET // 4)  # the audit first, 25 % of the budget
        assert set(rules[BUDGET // 4:]) <= {"cluster_margin", "margin", "coverage"}
        assert sel.num_rows == BUDGET and len(set(sel.column("doc_id").to_pylist())) == BUDGET
        assert all(p is not None for p in sel.column("predicted_label").to_pylist())  # recorded before labelling
        split = world.manifest(i)["task_model"]["loop"]
        assert sum(split["planned"].values()) == BUDGET - BUDGET // 4
        assert abs(sum(split["shares"].values()) - 1) < 1e-9


def test_the_history_judges_every_earlier_night_and_audits_the_model_of_each(loop):
    world = loop["world"]
    hist = world.history(3).to_pylist()
    nights = [r for r in hist if r["kind"] == "night"]
    assert {r["run_date"] for r in nights} == set(NIGHTS[:3])
    assert {r["evaluated_on"] for r in hist} == {NIGHTS[3]}
    topic = loop["topic"]
    for i in (1, 2):  # nights with a task model: their audit, labelled since, scores that night's model
        sel = world.selected(i).to_pylist()
        audit = [r for r in sel if r["rule"] == AUDIT]
        row = next(r for r in nights if r["run_date"] == NIGHTS[i] and r["rule"] == AUDIT)
        correct = sum(r["predicted_label"] == topic[r["doc_id"]] for r in audit)
        assert row["audit_n"] == len(audit) and row["accuracy"] == pytest.approx(correct / len(audit))
        assert row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"]
        assert row["macro_f1_low"] <= row["macro_f1"] <= row["macro_f1_high"]
        assert row["labels_before"] == world.manifest(i)["task_model"]["labels_used"]
        for rule_row in (r for r in nights if r["run_date"] == NIGHTS[i]):
            picks = [r for r in sel if r["rule"] == rule_row["rule"]]
            assert rule_row["picked"] == rule_row["labelled"] == len(picks)
            assert rule_row["wrong"] == sum(r["predicted_label"] != topic[r["doc_id"]] for r in picks)
    split = [r for r in hist if r["kind"] == "split"]
    assert [r["rule"] for r in split] == ["cluster_margin", "margin", "coverage"]
    assert all(r["evidence_audit"] == 2 * (BUDGET // 4) for r in split)  # nights two and three's audits
    curve = world.manifest(3)["task_model"]["loop"]["learning_curve"]
    assert [p["run_date"] for p in curve] == list(NIGHTS[1:3])


def test_labelnext_history_prints_the_curve_and_the_latest_split(loop):
    proc = loop["world"].cli("history", uri("out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    for date in NIGHTS[:3]:
        assert date in text
    assert "macro-F1" in text and "split of 2026-11-27" in text
    for rule in ("cluster_margin", "margin", "coverage"):
        assert rule in text


def test_a_backfill_of_night_two_after_night_three_gives_its_selection_and_split(loop):
    world = loop["world"]
    before_sel, before_split = world.selected(1), world.manifest(1)["task_model"]["loop"]
    proc = world.night(1, "labels-1/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after_sel, after_split = world.selected(1), world.manifest(1)["task_model"]["loop"]
    assert after_sel.select(["doc_id", "rule"]).equals(before_sel.select(["doc_id", "rule"]))
    assert after_split["shares"] == before_split["shares"] and after_split["planned"] == before_split["planned"]


def test_bad_history_is_skipped_with_a_counted_warning(loop):
    world = loop["world"]
    night3 = world.manifest(2)
    world.client.put_object(Bucket=BUCKET, Key=f"out/{night3['ledger']['path']}", Body=b"not parquet")
    world.put("out/ledger/run_date=2026-11-26/run_id=crashed/part-x.parquet", pa.table({"doc_id": ["x"]}))
    world.client.put_object(Bucket=BUCKET, Key=f"out/{night3['history']['path']}", Body=b"not parquet either")
    proc = world.night(3, "labels-3/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "history: 2 earlier night(s) left out of the evidence" in proc.stderr
    assert world.manifest(3)["task_model"]["loop"]["skipped_nights"] == 2
    shown = world.cli("history", uri("out"))
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "skipped 1 night(s)" in shown.stdout
