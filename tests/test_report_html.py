"""report.html shows what was selected (map, clusters, distributions) and the cost; both reports print plain
dollars and stages in pipeline order."""

from __future__ import annotations

import html
import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from labelnext.ops.io import storage
from labelnext.ops.io.s3 import StorageConfig
from labelnext.pipelines.report import data as rd
from labelnext.pipelines.cost import STAGES
from labelnext.pipelines.report.html import render_html
from labelnext.pipelines.report.terminal import print_report
from labelnext.pipelines.report.format import usd
from tests.cli_run import labelnext
from tests.headless import dump_dom, screenshot

SCIENTIFIC = re.compile(r"\d\.?\d*[eE][+-]?\d")


def _cost(small: float = 4.682e-05) -> dict:
    stages = {name: {"wall_s": 1.0, "docs": 10, "cpu_s": 1.0, "accelerator_s": 0.0, "usd": small * (i + 1)}
              for i, name in enumerate(STAGES)}
    return {"stages": stages, "total_usd": small * 21, "total_wall_s": 6.0,
            "counterfactuals": {"full_pass_scoring_model_usd": small * 400, "full_pass_70b_usd": 0.0731,
                                "annotation_usd": 1.2},
            "savings_ratio": 19.0, "headline": "h"}


def _stage_rows(terminal: str) -> list[str]:
    """Stage names in the order the terminal's cost table prints them (its rows start with a border)."""
    return [s for s in re.findall(r"^[\u2502|]\s*(\w+)\s", terminal, re.M) if s in STAGES]


# -- plain dollars, pipeline order ------------------------------------------------------------------------
@pytest.mark.parametrize("value, text", [(4.682e-05, "$0.0000468"), (0.0375, "$0.0375"), (19.4, "$19.40"),
                                         (1234567.891, "$1,234,567.89"), (0.0, "$0.00"), (1e-13, "$0.00"),
                                         (float("nan"), "n/a"), (None, "n/a")])
def test_usd_is_plain_notation(value, text):
    assert usd(value) == text


def test_dollars_are_never_scientific_in_the_html_or_the_terminal():
    page = render_html(_cost(), {"selected": 12}, "r", "2026-11-25")
    console = Console(file=io.StringIO(), width=200, record=True)
    print_report(_cost(), console)
    terminal = console.export_text()
    for text in (page, terminal):
        assert not SCIENTIFIC.search(text), SCIENTIFIC.search(text)
        assert "$0.0000468" in text  # the read stage, with three significant digits


def test_report_command_lists_stages_in_pipeline_order(tmp_path):
    layout = storage.RunLayout.create(str(tmp_path), "2026-11-25", "r", StorageConfig())
    storage.write_json(layout.objects, layout.path("cost_report.json"), _cost())  # stored with sorted keys
    storage.write_json(layout.objects, layout.path(storage.MANIFEST), {"status": "committed"})
    proc = labelnext("report", layout.uri())
    assert proc.returncode == 0, proc.stderr
    assert _stage_rows(proc.stdout) == list(STAGES)
    page = render_html(storage.read_json(layout.fs, layout.path("cost_report.json")), {}, "r", "2026-11-25")
    cells = re.findall(r"<tr><td>(\w+)</td>", page)
    assert [c for c in cells if c in STAGES] == list(STAGES)


# -- bounded view --------------------------------------------------------------------------------------------
def _synthetic(k: int, budget: int, per_cluster: int = 12, dim: int = 16, seed: int = 0):
    """A run's driver-side inputs at budget/k scale, and one block of assigned documents."""
    rng = np.random.default_rng(seed)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    centroids = unit(rng.normal(size=(k, dim)))  # spherical k-means: unit centroids, unit embeddings
    sizes = np.full(k, per_cluster, dtype=np.int64)
    sizes[: k // 10] *= 5  # some larger clusters
    clusters = np.repeat(np.arange(k), sizes)
    n = len(clusters)
    ids = np.array([f"doc-{i:08d}" for i in range(n)], dtype=object)
    long_text = "a fairly long document text that goes on " * 40
    embedding = unit(centroids[clusters] + 0.15 * rng.normal(size=(n, dim)))
    batch = {"doc_id": ids, "text": np.array([long_text] * n, dtype=object), "embedding": embedding,
             "cluster_id": clusters, "distance": 1.0 - np.sum(embedding * centroids[clusters], axis=1),
             "_rand_key": rng.integers(0, 2**53, size=n)}
    picked = rng.choice(n, size=min(5 * budget, n), replace=False)
    scored = pa.table({"doc_id": ids[picked], "cluster_id": clusters[picked], "distance": rng.random(len(picked)),
                       "candidate_reason": np.where(rng.random(len(picked)) < 0.7, "near_centroid", "diverse"),
                       "uncertainty": rng.gamma(2.0, 1.0, len(picked))})
    chosen = picked[:budget]
    selected = pa.table({"doc_id": ids[chosen], "rank": np.arange(budget), "cluster_id": clusters[chosen],
                         "uncertainty": rng.gamma(3.0, 1.0, budget), "reason": ["uncertain"] * budget,
                         "text": [long_text] * budget, "predicted_label": ["sports"] * budget,
                         "margin": rng.random(budget)})
    return selected, scored, centroids, sizes, batch


def _view(selected, scored, centroids, sizes, batch):
    """The report's view as a run gathers it, with the distributed pass run on one block in process."""
    plan = rd.plan_report(selected, scored, centroids, sizes)
    rows = rd.sample_rows(batch, plan.mean, plan.basis, plan.sample_cutoff, plan.wanted())
    index = {d: i for i, d in enumerate(batch["doc_id"])}
    texts = pa.table({"doc_id": scored.column("doc_id"),
                      "text": [batch["text"][index[d]] for d in scored.column("doc_id").to_pylist()]})
    return plan, rows, rd.build_view(plan, selected, scored, centroids, sizes, rows, texts)


def test_report_stays_under_2mb_at_budget_20000_and_k_4000():
    selected, scored, centroids, sizes, batch = _synthetic(k=4000, budget=20_000)
    plan, rows, view = _view(selected, scored, centroids, sizes, batch)
    page = render_html(_cost(), {"selected": 20_000}, "big", "2026-11-25", view)
    size = len(page.encode("utf-8"))
    assert size < 2_000_000, size
    # Bounded by the caps, not by the inputs: what came back from the distributed pass and what is drawn.
    assert rows.num_rows <= 1.5 * rd.MAP_DOCS * 1.2 + len(plan.wanted())
    assert view.docs.num_rows == rd.MAP_DOCS and view.map_selected.num_rows == rd.MAP_SELECTED
    assert page.count('class="cluster"') == 0 and page.count("class='cluster'") == rd.CLUSTERS_SHOWN
    assert page.count("<th>predicted label</th>") == rd.CLUSTERS_SHOWN  # label columns shown when present


def test_distributed_pass_returns_the_sample_and_the_highlighted_selection_only():
    selected, scored, centroids, sizes, batch = _synthetic(k=40, budget=2500, per_cluster=400)
    plan, rows, view = _view(selected, scored, centroids, sizes, batch)
    returned = rows.column("doc_id").to_pylist()
    in_sample = rows.column("in_sample").to_pylist()
    assert set(plan.wanted().tolist()) <= set(returned)
    assert {d for d, s in zip(returned, in_sample) if not s} <= set(plan.wanted().tolist())
    assert len(plan.wanted()) == rd.MAP_SELECTED < selected.num_rows  # a bounded share of the selection
    assert "text" not in rows.column_names  # texts come from the candidates on the driver, not the corpus
    # Projection: each cluster's circle sits at the middle of its own documents on the map.
    doc_xy = np.column_stack([view.docs.column("x").to_numpy(), view.docs.column("y").to_numpy()])
    clusters = view.docs.column("cluster_id").to_numpy()
    middles = np.array([doc_xy[clusters == c].mean(axis=0) for c in range(40)])
    spread = np.ptp(view.centroids_xy, axis=0).max()
    assert np.median(np.linalg.norm(middles - view.centroids_xy, axis=1)) < 0.05 * spread
    # Sections: largest clusters first, examples nearest the centroid first.
    assert list(view.shown_clusters[:4]) == [0, 1, 2, 3]
    for c, examples in view.examples.items():
        assert [e["distance"] for e in examples] == sorted(e["distance"] for e in examples)
        assert all(e["text"] and len(e["text"]) <= rd.TEXT_CHARS for e in examples)


# -- a real run, rendered by a browser ------------------------------------------------------------------------
def _nearest_texts(run: Path, corpus: Path, cluster: int) -> list[str]:
    """What the page should quote for ``cluster``: its nearest-to-centroid candidates' texts, from the
    run's scores and the corpus itself."""
    scores = pq.read_table(run / "scores").to_pylist()
    near = sorted((r for r in scores if r["cluster_id"] == cluster and r["candidate_reason"] == "near_centroid"),
                  key=lambda r: r["distance"])[: rd.EXAMPLES_PER_CLUSTER]
    corpus_rows = pq.read_table(corpus).to_pylist()
    text: dict[str, str] = {}
    for r in corpus_rows:
        text.setdefault(str(r["id"]), r["text"])  # the run keeps the first of duplicate ids
    return [rd.shorten(text[r["doc_id"]]) for r in near]


@pytest.mark.slow
def test_browser_shows_the_map_and_the_examples(default_run, sample_corpus, tmp_path):
    page = default_run / "report.html"
    dom = dump_dom(page)
    selected = pq.read_table(default_run / "selected")
    centroids = pq.read_table(default_run / "centroids.parquet")
    sizes = centroids.column("size").to_numpy()
    svg = re.search(r'<svg id="corpus-map".*?</svg>', dom, re.S)
    assert svg, "no corpus map on the page"
    svg = svg.group(0)
    assert svg.count("data-cluster=") == int((sizes > 0).sum())
    highlighted = re.search(r'<g class="selected".*?</g>', svg, re.S).group(0)
    assert highlighted.count("<circle") == selected.num_rows == 12
    largest = int(np.argmax(sizes))
    section = re.search(rf"<section class=\"cluster\" id=\"cluster-{largest}\">.*?</section>", dom, re.S)
    assert section, f"no section for the largest cluster {largest}"
    examples = _nearest_texts(default_run, sample_corpus, largest)
    assert examples and all(html.escape(t, quote=False) in section.group(0) for t in examples)
    for row in selected.to_pylist():  # each selected text is quoted under its cluster, with its uncertainty
        if row["cluster_id"] == largest:
            assert html.escape(rd.shorten(row["text"]), quote=False) in section.group(0)
            if row["uncertainty"] is not None:  # rules without LLM scoring leave it empty
                assert f"{row['uncertainty']:.3f}" in section.group(0)
    assert 'id="uncertainty-chart"' in dom and 'id="cluster-size-chart"' in dom
    assert not SCIENTIFIC.search(re.sub(r"<svg.*?</svg>", "", dom, flags=re.S))
    png = screenshot(page, tmp_path / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


@pytest.mark.slow
def test_report_open_prints_the_local_page_and_stages_in_order(default_run):
    proc = labelnext("report", str(default_run), "--open")
    assert proc.returncode == 0, proc.stderr
    assert f"report: {default_run / 'report.html'}" in proc.stdout
    assert _stage_rows(proc.stdout) == list(STAGES)
    assert not SCIENTIFIC.search(proc.stdout)
