"""End to end: the real pipeline (real models, local Ray) through the CLI, checked against the contract."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from labelnext.ops.select.selector import SELECTED_COLUMNS
from tests.cli_run import LLM_RULE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "labelnext.pipelines.cli", *args], cwd=REPO, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )


# committed_run (an LLM-ranked rule, so the score stage runs) and default_run (the packaged default, no LLM)
# are session fixtures in conftest.py, shared with the cost and report tests.


def test_contract_layout_manifest_and_counts(committed_run, sample_corpus):
    run_dir, proc = committed_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "committed"
    assert manifest["run_id"] == "e2e" and manifest["run_date"] == "2026-11-25"
    for key in ("files", "config", "versions", "counts"):
        assert key in manifest
    counts = manifest["counts"]
    source_rows = pq.read_metadata(sample_corpus).num_rows
    assert counts["input_docs"] == source_rows
    assert counts["accepted_docs"] + counts["rejected_docs"] == source_rows
    assert counts["rejected_docs"] == 3  # null, blank and duplicate rows planted in the sample corpus
    assert counts["selected"] == 12
    assert 0 < counts["candidates_scored"] <= 5 * 12
    assert counts["clusters"] >= 2
    for entry in manifest["files"]:
        path = run_dir / entry["path"]
        assert path.stat().st_size == entry["bytes"]
        if path.suffix == ".parquet":
            assert pq.read_metadata(path).num_rows == entry["rows"]
    names = {e["path"].split("/")[0] for e in manifest["files"]}
    assert {"selected", "scores", "assignments", "rejects", "centroids.parquet", "cost_report.json"} <= names
    assert "committed" in proc.stdout


def test_a_successful_run_logs_no_errors(committed_run):
    """Actor pools (embed, score) ran, yet no ERROR-level line reached the user: not from Ray's C++ core
    (``[... E pid tid] file.cc``) nor from Python logging."""
    _, proc = committed_run
    ray_errors = re.findall(r"^\[[^\]]* E \d+ \d+\].*$", proc.stderr, re.M)
    python_errors = re.findall(r"^\S+ (?:ERROR|CRITICAL) .*$", proc.stderr, re.M)
    assert not ray_errors and not python_errors, (ray_errors + python_errors)[:5]
    assert "score:" in proc.stderr  # the LLM stage ran (its actor pool is what used to log the error)


def test_a_default_run_on_cpu_logs_no_warning(default_run_proc):
    """The packaged default on a CPU-only machine prints only what a user should act on: no WARNING line from
    labelnext (its GPU sizes are no ask on a cluster without GPUs) nor from Ray (``W`` lines of its C++ core,
    Python warnings such as "no available CPUs ... will hang" after a stage's actor pool finished)."""
    stderr = default_run_proc[1].stderr
    ray_warnings = re.findall(r"^\[[^\]]* W \d+ \d+\].*$", stderr, re.M)
    python_warnings = re.findall(r"^.*\bWARNING\b.*$", stderr, re.M)
    assert not ray_warnings and not python_warnings, (ray_warnings + python_warnings)[:5]
    assert "select: 12 documents (rule cluster_only)" in stderr and stderr.count("select: started") == 1


def test_selected_scores_and_rejects(committed_run):
    run_dir, _ = committed_run
    selected = pq.read_table(run_dir / "selected")
    assert list(SELECTED_COLUMNS) == selected.column_names[: len(SELECTED_COLUMNS)]
    ids = selected.column("doc_id").to_pylist()
    assert len(ids) == 12 == len(set(ids))
    scores = pq.read_table(run_dir / "scores")
    assert set(ids) <= set(scores.column("doc_id").to_pylist())
    unc = scores.column("uncertainty").to_pylist()
    assert all(u is not None and 0 < u < 11 for u in unc)  # nats, below log(49152)
    rejects = pq.read_table(run_dir / "rejects").to_pylist()
    assert {r["reason"] for r in rejects} == {"null_text", "empty_text", "duplicate_id"}
    assert all(r["source_file"].endswith("sample.parquet") and r["row"] >= 0 for r in rejects)
    assignments = pq.read_table(run_dir / "assignments")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert assignments.num_rows == manifest["counts"]["accepted_docs"]


def test_selection_matches_the_recorded_golden(default_run):
    """Same corpus, budget, seed and packaged default config: the same documents in the same order.

    ``tests/golden/e2e_selection.json`` records the selection this run gave before a refactor; a change that
    is meant to alter the selection (a new default rule, new tie-breaks) rewrites the file in the same commit,
    with the reason in the commit message.
    """
    run_dir = default_run
    golden = json.loads((REPO / "tests" / "golden" / "e2e_selection.json").read_text())
    selected = pq.read_table(run_dir / "selected").sort_by("rank")
    assert selected.column("doc_id").to_pylist() == golden["doc_ids_by_rank"]


def test_a_cold_start_without_the_llm_is_priced_against_a_70b_pass(default_run):
    cost = json.loads((default_run / "cost_report.json").read_text())
    assert "score" not in cost["stages"] or cost["stages"]["score"]["docs"] == 0
    cf = cost["counterfactuals"]
    assert cost["savings_ratio"] is None and cf["full_pass_scoring_model_usd"] is None  # no throughput measured
    assert cost["corpus"]["estimated_tokens"] > 0 and cf["full_pass_70b_usd"] > cost["total_usd"] > 0
    assert "No document went through the LLM" in cost["headline"] and "x less" in cost["headline"]


def test_cost_report(committed_run):
    run_dir, _ = committed_run
    cost = json.loads((run_dir / "cost_report.json").read_text())
    for stage in ("read", "embed", "cluster", "score", "select", "write"):
        st = cost["stages"][stage]
        assert st["wall_s"] > 0 and "usd" in st and "docs" in st
    assert cost["stages"]["score"]["tokens"] > 0
    assert cost["stages"]["score"]["docs"] <= 60
    cf = cost["counterfactuals"]
    assert cf["full_pass_scoring_model_usd"] > 0 and cf["full_pass_70b_usd"] > cf["full_pass_scoring_model_usd"]
    assert cf["annotation_usd"] == pytest.approx(12 * 0.10)
    assert cost["savings_ratio"] == pytest.approx(cf["full_pass_scoring_model_usd"] / cost["total_usd"])


def test_report_command_prints_headline(committed_run):
    run_dir, _ = committed_run
    proc = run_cli("report", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "cost per stage" in proc.stdout and "embed" in proc.stdout


def test_rerun_same_run_id_replaces_whole(committed_run, sample_corpus):
    run_dir, _ = committed_run
    before = sorted(p.name for p in (run_dir / "assignments").iterdir())
    # The same run again (the transformers backend, to skip a second vLLM start-up; the selection rule and
    # every output are the same kind).
    proc = run_cli("run", "--corpus", str(sample_corpus), "--output", str(run_dir.parent.parent), "--budget", "12",
                   "--run-id", "e2e", "--run-date", "2026-11-25", "--set", "ray.num_cpus=2", *LLM_RULE,
                   "--set", "score.backend=transformers")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = sorted(p.name for p in (run_dir / "assignments").iterdir())
    assert len(after) == len(before)
    total = sum(pq.read_metadata(run_dir / "assignments" / f).num_rows for f in after)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert total == manifest["counts"]["accepted_docs"]


@pytest.mark.parametrize("args, message", [
    (["--corpus", "/nonexistent/corpus.parquet"], "corpus not found"),
    (["--set", "embed.modle=x"], "embed.modle"),
    (["--budget", "0"], "--budget"),
    (["--run-id", "../escape"], "invalid run id"),
])
def test_bad_invocations_exit_nonzero_with_one_line(args, message, sample_corpus, tmp_path):
    base = {"--corpus": str(sample_corpus), "--output": str(tmp_path), "--budget": "5"}
    for i in range(0, len(args), 2):
        if args[i] in base:
            base[args[i]] = args[i + 1]
    extra = [a for i in range(0, len(args), 2) if args[i] not in base for a in args[i:i + 2]]
    flat = [x for kv in base.items() for x in kv] + extra
    proc = run_cli("run", *flat)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
