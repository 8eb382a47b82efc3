"""A run told the task (configs/demo.yaml's prompt): the LLM's answer lands in scores/ and selected/, and the
cost report prices the prompt (the real pipeline through the CLI, local Ray, real models)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from labelnext.pipelines.config import load_config
from tests.cli_run import QUICK, labelnext, run_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompted_run(sample_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("out-prompt")
    proc = labelnext("run", "--config", "demo", "--corpus", str(sample_corpus), "--output", str(out), "--budget",
                     "8", "--run-id", "task", "--run-date", "2026-11-25", *QUICK, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir(out, "task")


def test_scores_and_selection_carry_the_llm_answer(prompted_run):
    choices = load_config("demo").score.task.choices
    scores = pq.read_table(prompted_run / "scores").to_pydict()
    selected = pq.read_table(prompted_run / "selected").to_pydict()
    assert len(scores["doc_id"]) == 5 * 8 and len(selected["doc_id"]) == 8
    probs = np.array(scores["llm_probs"], dtype=np.float64)
    assert probs.shape == (40, len(choices))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert scores["llm_label"] == [choices[i] for i in probs.argmax(axis=1)]
    top = -np.sort(-probs, axis=1)
    np.testing.assert_allclose(scores["llm_margin"], top[:, 0] - top[:, 1], atol=1e-5)
    entropy = -(probs * np.log(np.clip(probs, 1e-30, None))).sum(axis=1)
    np.testing.assert_allclose(scores["uncertainty"], entropy, atol=1e-4)
    by_id = dict(zip(scores["doc_id"], scores["llm_label"]))
    assert selected["llm_label"] == [by_id[d] for d in selected["doc_id"]]
    assert len(set(scores["llm_label"])) >= 2  # the calibrated model does not answer one topic for everything


def test_cost_report_prices_the_prompt(prompted_run):
    report = json.loads((prompted_run / "cost_report.json").read_text())
    manifest = json.loads((prompted_run / "manifest.json").read_text())
    score = report["stages"]["score"]
    assert score["prompt"] == "6 choices"
    scores = pq.read_table(prompted_run / "scores", columns=["n_tokens"]).column("n_tokens").to_pylist()
    assert score["tokens"] == sum(scores)
    # Every scored document costs at least the instruction and the six answers around it.
    assert min(scores) > 40
    per_doc = report["corpus"]["estimated_tokens"] / manifest["counts"]["accepted_docs"]
    assert per_doc > min(scores) * 0.5 and per_doc > 40


def test_the_llm_rule_scores_candidates_on_a_night_with_labels(prompted_run, sample_corpus, tmp_path):
    """With labels the LLM stage is skipped by default; select.rules with the llm rule turns it on, and the
    rule's share of the selection is ranked with the LLM's answer beside the task model's margin."""
    import pyarrow as pa

    corpus = pq.read_table(sample_corpus, columns=["id", "topic"]).to_pydict()
    topic = dict(zip(corpus["id"], corpus["topic"]))
    picked = pq.read_table(prompted_run / "selected", columns=["doc_id"]).column("doc_id").to_pylist()
    labelled = [d for d in corpus["id"] if topic[d] is not None][:30] + picked
    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"doc_id": labelled, "label": [topic[d] for d in labelled]}), labels)
    out = prompted_run.parent.parent
    proc = labelnext("run", "--config", "demo", "--corpus", str(sample_corpus), "--output", str(out), "--budget",
                     "8", "--run-id", "task", "--run-date", "2026-11-26", "--labels", str(labels),
                     "--set", "select.rules=[cluster_margin, llm]", "--set", "select.rules_lead=0", *QUICK,
                     timeout=900)  # no incumbent: without evidence yet the two rules split the budget evenly
    assert proc.returncode == 0, proc.stderr[-4000:]
    night = run_dir(out, "task", "2026-11-26")
    manifest = json.loads((night / "manifest.json").read_text())
    assert manifest["task_model"]["status"] == "trained"
    assert manifest["task_model"]["llm_scoring"].startswith("on: select.rules has the llm rule")
    assert manifest["counts"]["candidates_scored"] > 0
    selected = pq.read_table(night / "selected").to_pydict()
    assert selected["rule"][0] == "audit" and set(selected["rule"][1:]) <= {"cluster_margin", "llm"}
    assert selected["rule"].count("llm") == manifest["task_model"]["loop"]["planned"]["llm"] >= 3
    for rule, label in zip(selected["rule"], selected["llm_label"]):
        assert (label is not None) == (rule != "audit")  # scored candidates; the audit is drawn from every doc
