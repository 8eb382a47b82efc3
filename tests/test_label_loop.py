"""The nightly label loop end to end, through the CLI, against a real S3 endpoint (moto's server).

Night one is a cold start. Annotators return labels (the sample corpus' topics) for its selection and for a
few other documents, one of them corrected the next night, one with a null label and one for a document no
run ever saw. Night two runs with ``--labels`` on a corpus that lost some of night one's documents and gained
new ones: it must select none of the labelled ids, train the task model on vectors from the embedding cache
and from tonight's corpus, rank by its margin without the LLM, and record all of it.
"""

from __future__ import annotations

import collections

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labelnext.ops.select.task_model import TaskModel
from labelnext.pipelines.sample_corpus import make_documents
from tests.cli_run import QUICK, error_line, labelnext
from tests.s3_fixtures import S3Bucket, s3_endpoint  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

N_DOCS, DROPPED, NEW_DOCS, BUDGET = 120, 40, 16, 8
BUCKET = "labelloop"
NIGHT = ("--budget", str(BUDGET), "--run-id", "nightly", *QUICK)


def World(endpoint: str) -> S3Bucket:
    return S3Bucket(endpoint, BUCKET)


def _run_key(run_date: str) -> str:
    return f"out/run_date={run_date}/run_id=nightly"


@pytest.fixture(scope="module")
def loop(s3_endpoint):
    world = World(s3_endpoint)
    docs = make_documents(N_DOCS, seed=5)  # N docs + one planted bad row
    new = make_documents(N_DOCS + NEW_DOCS, seed=5).slice(N_DOCS, NEW_DOCS)
    new = new.set_column(0, "id", pa.array([f"new-{i:04d}" for i in range(NEW_DOCS)]))
    world.put("corpus/night1/part-0.parquet", docs)
    world.put("corpus/night2/part-0.parquet", docs.slice(DROPPED))
    world.put("corpus/night2/part-1.parquet", new)

    night1 = world.run("--corpus", world.uri("corpus/night1/"), "--output", world.uri("out"),
                       "--run-date", "2026-11-24", *NIGHT)
    assert night1.returncode == 0, night1.stderr[-3000:]
    topic = dict(zip(docs.column("id").to_pylist(), docs.column("topic").to_pylist()))
    topic.update(zip(new.column("id").to_pylist(), new.column("topic").to_pylist()))
    picked = world.table(f"{_run_key('2026-11-24')}/selected/").column("doc_id").to_pylist()

    # Night-one labels, one of them wrong; the next file (written later) corrects it and adds more.
    first = {d: topic[d] for d in picked}
    first[picked[0]] = "mislabelled"
    world.put("labels/2026-11-24/part-0.parquet", pa.table({"doc_id": list(first), "label": list(first.values())}))
    # Unselected documents still in tonight's corpus (a second label for every class seen once), two new ones.
    per_class = collections.Counter(topic[d] for d in picked)
    extra = []
    for doc_id in docs.column("id").to_pylist()[DROPPED:N_DOCS]:
        if doc_id not in picked and doc_id not in extra and per_class[topic[doc_id]] < 2:
            extra.append(doc_id)
            per_class[topic[doc_id]] += 1
    extra += ["new-0000", "new-0001"]
    second = {picked[0]: topic[picked[0]], **{d: topic[d] for d in extra}, "never-seen": "food"}
    world.put("labels/2026-11-25/part-0.parquet", pa.table({
        "doc_id": [*second, "null-label"], "label": pa.array([*second.values(), None], pa.string())}))

    # A rule that ranks by the LLM: with labels its scoring is skipped all the same (select.llm_with_labels).
    night2 = world.run("--corpus", world.uri("corpus/night2/"), "--output", world.uri("out"),
                       "--run-date", "2026-11-25", *NIGHT, "--labels", world.uri("labels/"),
                       "--set", "select.rule=typical_uncertain")
    return {"world": world, "night1": night1, "night2": night2, "labels": {**first, **second}, "docs": docs}


def test_night_one_is_a_cold_start(loop):
    world = loop["world"]
    manifest = world.json(f"{_run_key('2026-11-24')}/manifest.json")
    assert manifest["task_model"] is None and "labels_without_embedding" not in manifest["counts"]
    selected = world.table(f"{_run_key('2026-11-24')}/selected/")
    assert selected.num_rows == BUDGET
    assert selected.column("margin").null_count == BUDGET and selected.column("predicted_label").null_count == BUDGET


def test_night_two_selects_no_labelled_document_and_ranks_by_margin(loop):
    night2, world = loop["night2"], loop["world"]
    assert night2.returncode == 0, night2.stderr[-3000:]
    selected = world.table(f"{_run_key('2026-11-25')}/selected/")
    ids = selected.column("doc_id").to_pylist()
    assert len(ids) == BUDGET == len(set(ids))
    assert not set(ids) & set(loop["labels"])  # the extra labelled ids are excluded by the labels alone
    manifest = world.json(f"{_run_key('2026-11-25')}/manifest.json")
    classes = manifest["task_model"]["classes"]
    assert set(selected.column("predicted_label").to_pylist()) <= set(classes)
    margins = selected.column("margin").to_pylist()
    assert all(m is not None and 0.0 <= m <= 1.0 for m in margins)
    # One audit document (select.audit_share 0.05 of 8, at least one), drawn first; the rest by Cluster-Margin.
    assert selected.column("rule").to_pylist() == ["audit"] + ["cluster_margin"] * (BUDGET - 1)
    assert set(selected.column("reason").to_pylist()[1:]) <= {"cluster_quota_margin", "fill"}
    assert "first a uniform audit sample of select.audit_share 0.05" in night2.stderr
    # The log names the rule that chose (not select.rule, which only a cold start uses), and the select stage once.
    assert f"select: {BUDGET} documents (Cluster-Margin: the task model's margin" in night2.stderr
    assert night2.stderr.count("select: started") == 1 and "task model: started" in night2.stderr
    assert manifest["counts"]["candidates_scored"] == 0  # select.llm_with_labels is off by default
    assert manifest["config"]["select"]["rule"] == "typical_uncertain"
    cost = world.json(f"{_run_key('2026-11-25')}/cost_report.json")
    assert "select.llm_with_labels is false" in cost["stages"]["score"]["skipped"]
    assert manifest["task_model"]["llm_scoring"] == cost["stages"]["score"]["skipped"]


def test_night_two_trains_the_task_model_and_records_it(loop):
    world, labels = loop["world"], loop["labels"]
    assert loop["night2"].returncode == 0, loop["night2"].stderr[-3000:]
    manifest = world.json(f"{_run_key('2026-11-25')}/manifest.json")
    task = manifest["task_model"]
    true_labels = {d: label for d, label in labels.items() if d != "never-seen"}
    assert task["status"] == "trained"
    assert task["classes"] == sorted(set(true_labels.values()))  # the corrected label won: no "mislabelled"
    assert task["labels_used"] == len(true_labels)
    assert (task["labels_without_embedding"], task["null_labels"], task["duplicate_labels"]) == (1, 1, 1)
    assert task["rows"] == len(labels) + 2 and task["files"] == 2
    assert task["label_counts"] == dict(collections.Counter(labels.values()))  # labels so far, per class
    dropped = set(loop["docs"].column("id").to_pylist()[:DROPPED])
    assert task["vectors_from"] == {
        "earlier_cache": sum(1 for d in true_labels if d in dropped),  # not in tonight's corpus: from the cache
        "tonight_embedded": 2,  # the two new documents, never embedded before
        "tonight_cached": sum(1 for d in true_labels if d not in dropped and not d.startswith("new-")),
    }
    assert task["cv_folds"] >= 2 and 0.0 <= task["cv_accuracy"] <= 1.0
    assert sum(task["selected_predicted_counts"].values()) == BUDGET
    counts = manifest["counts"]
    assert (counts["labels_used"], counts["labels_without_embedding"], counts["null_labels"],
            counts["duplicate_labels"]) == (len(true_labels), 1, 1, 1)
    cost = world.json(f"{_run_key('2026-11-25')}/cost_report.json")
    assert cost["task_model"] == task
    assert cost["stages"]["embed"]["labelled_embedded"] == 2
    assert "task_model.parquet" in {e["path"] for e in manifest["files"]}
    saved = pq.read_table(pa.BufferReader(world.body(f"{_run_key('2026-11-25')}/task_model.parquet")))
    assert list(TaskModel.from_table(saved).classes) == task["classes"]


def test_a_bad_label_file_fails_the_run_with_one_line(sample_corpus, tmp_path):
    bad = tmp_path / "labels" / "part-0.parquet"
    bad.parent.mkdir()
    pq.write_table(pa.table({"doc_id": ["doc-000001"], "topic": ["food"]}), bad)
    proc = labelnext("run", "--corpus", str(sample_corpus), "--output", str(tmp_path / "out"), "--budget", "4",
                     "--run-id", "bad", "--labels", str(tmp_path / "labels"), *QUICK)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert error_line(proc).endswith(f"input.labels {bad}: missing column 'label' (has: doc_id, topic); "
                                     "set input.label_column")
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").rglob("manifest.json"))
