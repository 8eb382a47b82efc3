"""Scale: the driver stays bounded by the budget, not the corpus, and time per document stays flat in N.

Synthetic corpora that already carry their vectors (``input.embedding_column``: short text, 384-d vectors
with cluster structure) go through ``labelnext run`` on the embedded default (local Ray) as subprocesses, at
N = 250k, 1M and 2M with budget 20,000 and k 4,000 (``select.rule=cluster_only``: no LLM), plus one N = 1M
run at budget 2,000 through the real LLM stage. Each run's cost report gives the per-stage wall time, the
driver's peak RSS, the object store's peak and the rows collected on the driver. Verdicts are computed from
those figures against the smallest run measured in the same invocation.

    python -m bench.scale                 # N = 250k, 1M, 2M + the 1M LLM run (about an hour on 2 cores)
    python -m bench.scale --sizes 250000 1000000 --no-llm
    python -m bench.scale --quick         # N = 25k and 100k, budget 2,000, LLM run at 25k (minutes)

Corpora are generated in chunks (one row group each) into ``--cache-dir`` and reused by later invocations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import OUT, ROOT, log, machine_description, markdown_table  # noqa: E402

DIM = 384
TOPICS = 500  # cluster structure of the synthetic vectors
CHUNK_ROWS = 50_000  # rows generated at a time, one Parquet row group each
NOISE = 0.6  # spread of a document's vector around its topic centre (before normalisation)
STAGES = ("read", "embed", "cluster", "score", "select", "write")
WORDS = ("model data corpus label budget cluster vector token entropy annotator sample document score select "
         "river bread engine garden market signal harbour winter orbit violin paper ladder copper meadow").split()

# Thresholds of the acceptance checks.
MAX_RSS_RATIO = 1.5
MAX_ROWS_PER_CANDIDATE = 3.0
MAX_MS_PER_DOC_RATIO = 1.25
MAX_SELECT_S = 10.0


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    budget: int
    k: int
    llm_docs: Optional[int]
    llm_budget: int


FULL = Plan(sizes=(250_000, 1_000_000, 2_000_000), budget=20_000, k=4_000, llm_docs=1_000_000, llm_budget=2_000)
QUICK = Plan(sizes=(25_000, 100_000), budget=2_000, k=400, llm_docs=25_000, llm_budget=200)


# -- corpora -------------------------------------------------------------------------------------------------
def write_vector_corpus(path: Path, n: int, seed: int = 0, dim: int = DIM, chunk_rows: int = CHUNK_ROWS) -> Path:
    """``n`` documents (``id``, ``text``, ``embedding``: fixed-size list of float32) in one Parquet file with a
    row group per chunk, written chunk by chunk; reused when it already holds ``n`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists() and pq.read_metadata(path).num_rows == n:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((TOPICS, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic_words = rng.integers(0, len(WORDS), size=(TOPICS, 6))
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
    tmp = path.with_suffix(".partial")
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, n, chunk_rows):
            rows = min(chunk_rows, n - start)
            topics = rng.integers(0, TOPICS, size=rows)
            vectors = centres[topics] + NOISE / math.sqrt(dim) * rng.standard_normal((rows, dim), dtype=np.float32)
            ids = [f"doc-{i:09d}" for i in range(start, start + rows)]
            texts = [f"{' '.join(WORDS[w] for w in topic_words[t])} note {i}" for i, t in zip(range(start, start + rows), topics)]
            writer.write_table(pa.table({
                "id": pa.array(ids, pa.string()),
                "text": pa.array(texts, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
            }, schema=schema))
    os.replace(tmp, path)
    return path


# -- one run -------------------------------------------------------------------------------------------------
@dataclass
class Run:
    name: str
    docs: int
    budget: int
    rule: str
    stages: dict[str, float]
    pipeline_s: float
    process_s: float
    rss: int
    store_peak: Optional[int]
    rows_collected: int
    candidates: int
    selected: int
    k: Optional[int] = None  # cluster.k when the run set it
    load: Optional[float] = None  # the machine's 15-minute load average when the run ended: what ran beside it
    output_bytes: Optional[int] = None  # the run folder's size on disk

    @property
    def ms_per_doc(self) -> float:
        return 1000.0 * self.pipeline_s / self.docs


def run_pipeline(corpus: Path, docs: int, budget: int, k: Optional[int], rule: str, name: str,
                 extra: tuple[str, ...] = ()) -> Run:
    out = Path(tempfile.mkdtemp(prefix="labelnext-scale-"))
    args = [sys.executable, "-m", "labelnext.pipelines.cli", "run", "--corpus", str(corpus), "--output", str(out),
            "--budget", str(budget), "--run-id", name, "--run-date", "2026-01-01",
            "--set", "input.embedding_column=embedding", "--set", f"select.rule={rule}",
            "--set", "output.include_text=false", "--set", "ray.num_cpus=2", *extra]
    if k is not None:
        args += ["--set", f"cluster.k={k}"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    log(f"{name}: labelnext run over {docs:,} docs (budget {budget:,}, rule {rule})")
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    process_s = time.perf_counter() - start
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        run_dir = out / "run_date=2026-01-01" / f"run_id={name}"
        cost = json.loads((run_dir / "cost_report.json").read_text())
        manifest = json.loads((run_dir / "manifest.json").read_text())
        output_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    stages = {s: float(cost["stages"].get(s, {}).get("wall_s", 0.0)) for s in STAGES}
    run = Run(name=name, docs=docs, budget=budget, rule=rule, stages=stages, pipeline_s=sum(stages.values()),
              process_s=process_s, rss=int(cost["driver"]["peak_rss_bytes"]),
              store_peak=cost["object_store"]["peak_bytes"], rows_collected=int(cost["driver"]["rows_collected"]),
              candidates=int(manifest["counts"]["candidates"]), selected=int(manifest["counts"]["selected"]),
              k=k, load=round(os.getloadavg()[2], 2), output_bytes=output_bytes)
    log(f"{name}: {run.pipeline_s:.0f} s in stages, {process_s:.0f} s in all, driver RSS {run.rss / 2**20:.0f} MiB, "
        f"{run.rows_collected:,} rows collected for {run.candidates:,} candidates")
    return run


# -- report --------------------------------------------------------------------------------------------------
def mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def runs_table(runs: list[Run]) -> str:
    headers = ["run", "docs", "budget", *[f"{s} s" for s in STAGES], "stages s", "process s", "ms/doc",
               "driver peak RSS MiB", "object store peak MiB", "rows collected", "candidates", "rows / candidate",
               "output MiB", "load (15 min)"]
    rows = [[r.name, f"{r.docs:,}", f"{r.budget:,}", *[f"{r.stages[s]:.1f}" for s in STAGES], f"{r.pipeline_s:.0f}",
             f"{r.process_s:.0f}", f"{r.ms_per_doc:.3f}", mib(r.rss), mib(r.store_peak), f"{r.rows_collected:,}",
             f"{r.candidates:,}", f"{r.rows_collected / max(r.candidates, 1):.2f}", mib(r.output_bytes),
             "n/a" if r.load is None else f"{r.load:.1f}"] for r in runs]
    return markdown_table(headers, rows)


def verdicts(scaling: list[Run], llm: Optional[Run]) -> list[tuple[str, str, bool]]:
    """(check, figures, passed) for each acceptance check, computed from the measured runs."""
    small, large = scaling[0], scaling[-1]
    out = []
    rss_ratio = large.rss / small.rss
    out.append((f"driver peak RSS at {large.docs:,} within {MAX_RSS_RATIO}x of {small.docs:,}",
                f"{mib(large.rss)} / {mib(small.rss)} MiB = {rss_ratio:.2f}x", rss_ratio <= MAX_RSS_RATIO))
    for r in scaling + ([llm] if llm else []):
        ratio = r.rows_collected / max(r.candidates, 1)
        out.append((f"{r.name}: rows collected on the driver <= {MAX_ROWS_PER_CANDIDATE:g} x candidates",
                    f"{r.rows_collected:,} / {r.candidates:,} = {ratio:.2f}x", ratio <= MAX_ROWS_PER_CANDIDATE))
    # Against the next-largest run: the smallest one carries fixed costs (k-means training on 64 x k rows) that
    # larger runs spread over more documents, so the ratio to it flatters growth.
    base = scaling[-2] if len(scaling) > 2 else small
    ms_ratio = large.ms_per_doc / base.ms_per_doc
    out.append((f"ms per document at {large.docs:,} within {MAX_MS_PER_DOC_RATIO}x of {base.docs:,}",
                f"{large.ms_per_doc:.3f} / {base.ms_per_doc:.3f} ms = {ms_ratio:.2f}x", ms_ratio <= MAX_MS_PER_DOC_RATIO))
    out.append((f"select under {MAX_SELECT_S:g} s at budget {large.budget:,} from {large.candidates:,} candidates",
                f"{large.stages['select']:.2f} s", large.stages["select"] < MAX_SELECT_S))
    return out


def report(plan: Plan, scaling: list[Run], llm: Optional[Run]) -> str:
    lines = [f"# Scale benchmark ({machine_description()})", "",
             f"Embedded default (local Ray, 2 CPUs), vectors from `input.embedding_column`; scaling runs at budget "
             f"{scaling[0].budget:,}, k {scaling[0].k or plan.k:,}, `select.rule=cluster_only`. ms/doc = sum of "
             "stage wall times / docs "
             "(process s adds Python and Ray start-up).", "",
             runs_table(scaling + ([llm] if llm else [])), "",
             markdown_table(["check", "measured", "verdict"],
                            [[c, f, "PASS" if ok else "FAIL"] for c, f, ok in verdicts(scaling, llm)])]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, minutes")
    parser.add_argument("--sizes", type=int, nargs="+", help="corpus sizes of the cluster_only runs")
    parser.add_argument("--no-llm", action="store_true", help="skip the run through the LLM stage")
    parser.add_argument("--cache-dir", type=Path, default=OUT / "scale-corpora")
    parser.add_argument("--out", type=Path, default=OUT / "scale.md")
    parser.add_argument("--report-only", action="store_true",
                        help="render the report and verdicts from the figures saved next to --out (OUT.json)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.report_only:
        runs = [Run(**r) for r in json.loads(args.out.with_suffix(".json").read_text())]
        scaling = sorted((r for r in runs if r.rule == "cluster_only"), key=lambda r: r.docs)
        llm = next((r for r in runs if r.rule != "cluster_only"), None)
        text = report(plan, scaling, llm)
        args.out.write_text(text)
        print(text)
        return 0
    sizes = tuple(sorted(args.sizes)) if args.sizes else plan.sizes
    if len(sizes) < 2:
        parser.error("--sizes needs at least two corpus sizes to compare")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done: list[Run] = []

    def measured(run: Run) -> Run:
        done.append(run)  # figures so far survive an interrupted invocation
        args.out.with_suffix(".json").write_text(json.dumps([r.__dict__ for r in done], indent=1))
        return run

    scaling = []
    for n in sizes:
        corpus = write_vector_corpus(args.cache_dir / f"vectors-{n}.parquet", n)
        spill = args.cache_dir / "spill"  # labelnext's ray.spill_dir: Ray spills the vectors here past its store
        spill.mkdir(parents=True, exist_ok=True)
        scaling.append(measured(run_pipeline(corpus, n, plan.budget, plan.k, "cluster_only", f"scale-{n}",
                                             extra=("--set", f"ray.spill_dir={spill.resolve()}"))))
    llm = None
    if plan.llm_docs and not args.no_llm:
        corpus = write_vector_corpus(args.cache_dir / f"vectors-{plan.llm_docs}.parquet", plan.llm_docs)
        llm = measured(run_pipeline(corpus, plan.llm_docs, plan.llm_budget, None, "typical_uncertain",
                                    f"llm-{plan.llm_docs}"))
    text = report(plan, scaling, llm)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
