"""Night two: what the second night costs when 1 % of the corpus is new and 1 % changed.

Night one runs ``labelnext run`` on N documents with the nightly settings that make the next night cheaper
(``embed.cache``, ``cluster.warm_start``, the ledger) and the real default encoder; night two runs on the same
corpus with 1 % of the texts changed and 1 % new documents added. The script checks what the product promises:
night two embeds only the new and changed documents, selects none of night one's picks, and costs a fraction of
night one's wall time. Both nights run in this invocation on the same machine, so the ratio is what counts.

    python -m bench.night_two --docs 250000            # real MiniLM: about an hour of embedding on 2 cores
    python -m bench.night_two --docs 20000             # minutes
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
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import OUT, ROOT, log, machine_description, markdown_table  # noqa: E402

STAGES = ("read", "embed", "cluster", "score", "select", "write")
NEW_SHARE = CHANGED_SHARE = 0.01
MAX_EMBEDDED_SHARE = 0.025
MAX_COST_RATIO = 1 / 3
NIGHTS = ("2026-11-24", "2026-11-25")
NIGHTLY = ("--set", "embed.cache=true", "--set", "cluster.warm_start=true", "--set", "output.ledger=true",
           "--set", "output.include_text=false", "--set", "ray.num_cpus=2", "--set", "ray.include_dashboard=false")


def corpora(folder: Path, n: int, seed: int = 7) -> tuple[Path, Path]:
    """Night one's corpus (``n`` documents) and night two's: the same ids, 1 % of the texts changed, 1 % new."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from labelnext.pipelines.sample_corpus import make_documents

    one, two = folder / f"night1-{n}.parquet", folder / f"night2-{n}.parquet"
    if one.exists() and two.exists():
        return one, two
    folder.mkdir(parents=True, exist_ok=True)
    n_new = int(n * NEW_SHARE)
    docs = make_documents(n + n_new, seed=seed).select(["id", "text"])
    docs = docs.filter(pa.compute.invert(pa.compute.is_null(docs.column("text"))))
    first, extra = docs.slice(0, n), docs.slice(n)
    pq.write_table(first, one)
    texts = first.column("text").to_pylist()
    step = max(1, round(1 / CHANGED_SHARE))
    for i in range(0, len(texts), step):  # every 100th document was edited since night one
        texts[i] = texts[i] + " Updated since the last night."
    extra = extra.filter(pa.compute.starts_with(extra.column("id"), "doc-")).slice(0, n_new)  # no planted bad rows
    extra = extra.set_column(0, "id", pa.array([f"new-{i:09d}" for i in range(extra.num_rows)]))
    pq.write_table(pa.concat_tables([first.set_column(1, "text", pa.array(texts)), extra]), two)
    return one, two


def run_night(corpus: Path, output: Path, budget: int, run_date: str) -> dict[str, Any]:
    args = [sys.executable, "-m", "labelnext.pipelines.cli", "run", "--corpus", str(corpus), "--output", str(output),
            "--budget", str(budget), "--run-id", "nightly", "--run-date", run_date, *NIGHTLY]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log(f"{run_date}: labelnext run over {corpus.name}")
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{run_date} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    run = output / f"run_date={run_date}" / "run_id=nightly"
    cost = json.loads((run / "cost_report.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    import pyarrow.parquet as pq

    selected = pq.read_table(run / "selected", columns=["doc_id"]).column("doc_id").to_pylist()
    stages = {s: float(v.get("wall_s", 0.0)) for s, v in cost["stages"].items()}
    out = {"run_date": run_date, "process_s": wall, "stages_s": sum(stages.values()), "stages": stages,
           "embedded": int(cost["stages"]["embed"].get("docs", 0)),
           "reused": int(cost["stages"]["embed"].get("reused", 0)), "counts": manifest["counts"],
           "warm_start_from": cost["stages"]["cluster"].get("warm_start_from"), "selected": selected}
    log(f"{run_date}: {out['stages_s']:.0f} s in stages, {out['embedded']:,} embedded, {out['reused']:,} reused")
    return out


def checks(n: int, one: dict, two: dict) -> list[tuple[str, str, bool]]:
    corpus_two = two["counts"]["input_docs"]
    share = two["embedded"] / corpus_two
    overlap = len(set(one["selected"]) & set(two["selected"]))
    ratio = two["stages_s"] / one["stages_s"]
    return [
        (f"night two embeds <= {MAX_EMBEDDED_SHARE:.1%} of its corpus", f"{two['embedded']:,} / {corpus_two:,} = "
         f"{share:.2%}", share <= MAX_EMBEDDED_SHARE),
        ("night two selects none of night one's picks", f"{overlap} in common", overlap == 0),
        (f"night two costs <= {MAX_COST_RATIO:.2f} of night one's wall time (stages)",
         f"{two['stages_s']:.0f} / {one['stages_s']:.0f} s = {ratio:.2f}", ratio <= MAX_COST_RATIO),
        ("night two's k-means starts from night one's centroids", str(two["warm_start_from"]),
         bool(two["warm_start_from"])),
    ]


def report(n: int, budget: int, one: dict, two: dict) -> str:
    stages = [s for s in STAGES if s in one["stages"] or s in two["stages"]]
    rows = [[night["run_date"], f"{night['counts']['input_docs']:,}", f"{night['embedded']:,}",
             f"{night['reused']:,}", f"{night['counts'].get('excluded_docs', 0):,}",
             *[f"{night['stages'].get(s, 0.0):.1f}" for s in stages], f"{night['stages_s']:.0f}",
             f"{night['process_s']:.0f}"] for night in (one, two)]
    lines = [f"# Night two at {n:,} documents ({machine_description()})", "",
             f"Real default encoder, budget {budget:,}, `embed.cache`, `cluster.warm_start`, the ledger. Night two: "
             f"night one's corpus with {CHANGED_SHARE:.0%} of the texts changed and {NEW_SHARE:.0%} new documents.",
             "", markdown_table(["night", "docs", "embedded", "from cache", "excluded",
                                 *[f"{s} s" for s in stages], "stages s", "process s"], rows), "",
             markdown_table(["check", "measured", "verdict"],
                            [[c, f, "PASS" if ok else "FAIL"] for c, f, ok in checks(n, one, two)])]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=250_000)
    parser.add_argument("--budget", type=int, help="default: 2 %% of --docs")
    parser.add_argument("--cache-dir", type=Path, default=OUT / "night-two-corpora")
    parser.add_argument("--out", type=Path, default=OUT / "night-two.md")
    args = parser.parse_args(argv)
    budget = args.budget or max(10, args.docs // 50)
    one_corpus, two_corpus = corpora(args.cache_dir, args.docs)
    output = Path(tempfile.mkdtemp(prefix="labelnext-night-two-"))
    try:
        one = run_night(one_corpus, output, budget, NIGHTS[0])
        two = run_night(two_corpus, output, budget, NIGHTS[1])
    finally:
        shutil.rmtree(output, ignore_errors=True)
    text = report(args.docs, budget, one, two)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0 if all(ok for _, _, ok in checks(args.docs, one, two)) else 1


if __name__ == "__main__":
    sys.exit(main())
