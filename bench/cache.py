"""Does the embedding cache pay? The embed stage's wall time with every vector from the cache, as a ratio to
embedding the same documents afresh.

Per size: the sample corpus (``labelnext sample-corpus``) goes through ``labelnext run`` twice into one output
folder with ``embed.cache=true`` and the ledger off (so both runs see the same documents): the first run embeds
everything and fills the cache, the second takes every vector from it. Each run is its own process with its
own local Ray, so neither finds the other's warm workers. The embed stage's wall time comes from each run's
cost_report.json.

    python -m bench.cache                  # 4,089 documents
    python -m bench.cache --docs 4089 20000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, machine_description, markdown_table, setup_env

RUN_DATE = "2026-01-01"
BUDGET = 20


@dataclass
class EmbedTiming:
    docs: int
    fresh_s: float
    cached_s: float
    reused: int

    @property
    def ratio(self) -> float:
        return self.cached_s / self.fresh_s


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def embed_stage(corpus: Path, out: Path, run_id: str) -> dict:
    """The embed stage's entry of one run's cost report."""
    args = [sys.executable, "-m", "labelnext.pipelines.cli", "run", "--corpus", str(corpus), "--output", str(out),
            "--budget", str(BUDGET), "--run-id", run_id, "--run-date", RUN_DATE,
            "--set", "embed.cache=true", "--set", "output.ledger=false", "--set", "ray.num_cpus=2",
            "--set", "ray.include_dashboard=false"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{run_id} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    cost = json.loads((out / f"run_date={RUN_DATE}" / f"run_id={run_id}" / "cost_report.json").read_text())
    return cost["stages"]["embed"]


def measure(docs: int) -> EmbedTiming:
    work = Path(tempfile.mkdtemp(prefix="labelnext-cache-bench-"))
    try:
        corpus = work / "corpus.parquet"
        subprocess.run([sys.executable, "-m", "labelnext.pipelines.cli", "sample-corpus", "--out", str(corpus),
                        "--docs", str(docs)], cwd=ROOT, check=True, capture_output=True)
        fresh = embed_stage(corpus, work / "out", "fresh")
        log(f"{docs:,} docs: embedded afresh in {fresh['wall_s']:.1f} s")
        cached = embed_stage(corpus, work / "out", "cached")
        log(f"{docs:,} docs: from the cache in {cached['wall_s']:.1f} s ({cached.get('reused', 0):,} reused)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if fresh.get("reused", 0) != 0 or cached["docs"] != 0:
        raise RuntimeError(f"expected a cold then a fully cached run, got {fresh} then {cached}")
    return EmbedTiming(docs, float(fresh["wall_s"]), float(cached["wall_s"]), int(cached.get("reused", 0)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, nargs="+", default=[4089], help="corpus sizes (sample corpus)")
    args = parser.parse_args(argv)
    setup_env()
    timings = [measure(n) for n in args.docs]
    print(f"Embed stage, every vector from the cache vs embedded afresh ({machine_description()}):\n")
    print(markdown_table(["docs", "afresh s", "from the cache s", "reused", "cached / afresh"],
                         [[f"{t.docs:,}", f"{t.fresh_s:.1f}", f"{t.cached_s:.1f}", f"{t.reused:,}",
                           f"{t.ratio:.2f}"] for t in timings]))
    return 0 if all(t.ratio < 1 for t in timings) else 1


if __name__ == "__main__":
    raise SystemExit(main())
