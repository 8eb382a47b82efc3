"""Throughput and cost: every figure is a ratio against a baseline measured in the same run on the same data.

1. embed: the ``Embedder`` stage (and the Ray-wrapped stage) vs a bare sentence-transformers ``encode`` loop on
   the same model and documents; a bf16 variant is measured with its fp32 parity.
2. cluster: FAISS k-means (``train_kmeans``) vs scikit-learn ``MiniBatchKMeans`` at the same k (time, inertia).
3. end to end: ``labelnext run`` as a subprocess at two corpus sizes; time per document and peak driver RSS.
4. cost: the run's measured cost vs the full-pass counterfactual (``savings_ratio`` from cost_report.json).

    python -m bench.throughput            # N = 2,500 and 10,000 end to end
    python -m bench.throughput --quick    # a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    OUT, ROOT, SHARED_DATA, log, machine_description, markdown_table, publish, setup_env, stopwatch,
)

BARE_BATCH = 32  # sentence-transformers' own default batch size
PARITY_ATOL = 1e-4
BF16_MIN_COSINE = 0.99
POLL_S = 0.1
KMEANS_NOISE = 0.1  # norm of the jitter added to resampled embeddings


@dataclass(frozen=True)
class Sizes:
    embed_docs: int
    kmeans_k: int
    e2e: tuple[int, ...]
    e2e_budget: int
    rounds: int


FULL = Sizes(embed_docs=1500, kmeans_k=64, e2e=(2500, 10000), e2e_budget=50, rounds=3)
QUICK = Sizes(embed_docs=300, kmeans_k=16, e2e=(400, 1600), e2e_budget=20, rounds=2)


@dataclass
class Row:
    measure: str
    baseline: str
    candidate: str
    ratio: str
    note: str = ""


# -- documents --------------------------------------------------------------------------------------------
def bench_texts(n: int, seed: int = 0) -> tuple[list[str], str]:
    """Real labelled text when ``../shared/data/`` is there (mixed lengths), else the generated demo corpus."""
    files = sorted(SHARED_DATA.glob("*.parquet")) if SHARED_DATA.is_dir() else []
    if files:
        import pyarrow.parquet as pq

        texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist() if t]
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(texts), min(n, len(texts)), replace=False)
        return [texts[i] for i in picked], f"{len(picked)} docs sampled from ../shared/data/"
    from labelnext.pipelines.sample_corpus import make_documents

    texts = [t for t in make_documents(n, seed=seed).column("text").to_pylist() if t and t.strip()]
    return texts[:n], f"{min(n, len(texts))} generated demo docs"


# -- 1. embed ---------------------------------------------------------------------------------------------
def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    with stopwatch() as t:
        out = fn()
    return out, t[0]


def _bare_model(cfg, dtype=None):
    from sentence_transformers import SentenceTransformer

    from labelnext.ops.embed.encoder import resolve_device, resolve_encoder_path

    kwargs = {"model_kwargs": {"torch_dtype": dtype}} if dtype is not None else {}
    model = SentenceTransformer(resolve_encoder_path(cfg.model), device=resolve_device("auto"), **kwargs)
    model.max_seq_length = min(cfg.max_seq_length, model.max_seq_length or cfg.max_seq_length)
    return model


def _bare_encode(model, texts: list[str]) -> np.ndarray:
    return np.asarray(model.encode(texts, batch_size=BARE_BATCH, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Run each function ``rounds`` times, alternating the order; best time per function (noise is one-sided)."""
    outs: dict[str, Any] = {}
    best = {name: float("inf") for name in fns}
    names = list(fns)
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            outs[name], t = _timed(fns[name])
            best[name] = min(best[name], t)
    return outs, best


def bench_embed(texts: list[str], cfg, rounds: int) -> tuple[list[Row], np.ndarray]:
    import torch

    from labelnext.ops.embed.encoder import CPU_BATCH_TOKENS, Embedder, resolve_device

    n = len(texts)
    bare = _bare_model(cfg)
    bf16 = _bare_model(cfg, torch.bfloat16)
    embedder = Embedder(cfg, device=resolve_device("auto"))
    for warm in (lambda: _bare_encode(bare, texts[:8]), lambda: _bare_encode(bf16, texts[:8]),
                 lambda: embedder.encode(texts[:8])):
        warm()
    outs, t = interleaved({"bare": lambda: _bare_encode(bare, texts), "embedder": lambda: embedder.encode(texts),
                           "bf16": lambda: _bare_encode(bf16, texts)}, rounds)
    ref, emb = outs["bare"], outs["embedder"]
    diff = float(np.abs(emb - ref).max())
    base = f"{n / t['bare']:.1f} (bare encode, batch {BARE_BATCH})"
    batching = f"<= {cfg.batch_size} docs and {CPU_BATCH_TOKENS} tokens per batch" if embedder.device == "cpu" \
        else f"batch {cfg.batch_size}"
    rows = [Row("embed: Embedder.encode docs/s", base, f"{n / t['embedder']:.1f} ({batching})",
                f"{t['bare'] / t['embedder']:.2f}x",
                f"max abs diff vs bare {diff:.1e} ({'ok' if diff <= PARITY_ATOL else 'MISMATCH'}); best of {rounds}")]
    low = outs["bf16"] / np.linalg.norm(outs["bf16"], axis=1, keepdims=True)
    cos = float(np.min(np.sum(low * ref, axis=1)))
    rows.append(Row("embed: bf16 weights docs/s (not enabled)", base, f"{n / t['bf16']:.1f}",
                    f"{t['bare'] / t['bf16']:.2f}x",
                    f"min cosine vs fp32 {cos:.4f} ({'within' if cos >= BF16_MIN_COSINE else 'outside'} "
                    f"{BF16_MIN_COSINE}); not batch-invariant at 1e-5"))
    ray_row = _bench_ray_embed(texts, cfg, t["bare"])
    if ray_row:
        rows.append(ray_row)
    return rows, emb


def _bench_ray_embed(texts: list[str], cfg, t_bare: float) -> Optional[Row]:
    """The Ray Data stage as the pipeline wires it (actor pool from labelnext.pipelines.placement), model load included."""
    try:
        import ray

        from labelnext.ops.embed.encoder import Embedder
        from labelnext.pipelines.placement import plan_placement
        from labelnext.ops.core.quiet import worker_env
    except ImportError as exc:
        log(f"ray embed stage skipped: {exc}")
        return None
    from labelnext.pipelines.config import load_config

    ray.init(num_cpus=os.cpu_count(), log_to_driver=False, runtime_env={"env_vars": worker_env()},
             include_dashboard=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        run_cfg = load_config()
        p = plan_placement(ray.cluster_resources(), run_cfg.resources, nodes=ray.nodes()).embed
        items = [{"doc_id": str(i), "text": t} for i, t in enumerate(texts)]
        ds = ray.data.from_items(items).materialize()

        def run() -> int:
            out = ds.map_batches(Embedder, fn_constructor_kwargs={"cfg": cfg, "device": "cpu"}, batch_size=cfg.batch_size * 4,
                                 concurrency=p.concurrency, num_cpus=p.num_cpus, batch_format="numpy")
            return out.materialize().count()

        count, t = _timed(run)
    finally:
        ray.shutdown()
    import torch

    threads = torch.get_num_threads()
    per_cpu = (count / t / (p.concurrency * p.num_cpus)) / (len(texts) / t_bare / threads)
    return Row("embed: Ray Data stage docs/s", f"{len(texts) / t_bare:.1f} (bare, {threads} threads)",
               f"{count / t:.1f}", f"{t_bare / t:.2f}x",
               f"{p.concurrency} actor(s) x {p.num_cpus:g} CPU as placed (pipelines.placement keeps 1 CPU for Ray Data); "
               f"per reserved CPU {per_cpu:.2f}x; includes actor start + model load")


# -- 2. cluster -------------------------------------------------------------------------------------------
def kmeans_data(emb: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points shaped like the real embeddings: resampled with small noise, renormalised."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, KMEANS_NOISE / np.sqrt(emb.shape[1]), (n, emb.shape[1])).astype(np.float32)
    x = emb[rng.integers(0, len(emb), n)] + noise
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def objectives(x: np.ndarray, centroids: np.ndarray) -> tuple[float, float]:
    """(inertia, cosine objective): squared Euclidean distance to the nearest centroid (scikit-learn's
    definition) and sum of 1 - cosine to the nearest centroid (what the pipeline's Assigner uses)."""
    import faiss

    c = np.ascontiguousarray(centroids, dtype=np.float32)
    l2 = faiss.IndexFlatL2(x.shape[1])
    l2.add(c)
    d, _ = l2.search(x, 1)
    unit = np.ascontiguousarray(c / np.linalg.norm(c, axis=1, keepdims=True))
    ip = faiss.IndexFlatIP(x.shape[1])
    ip.add(unit)
    s, _ = ip.search(x, 1)
    return float(d.sum()), float((1.0 - s).sum())


def bench_kmeans(emb: np.ndarray, k: int, cluster_cfg, rounds: int) -> list[Row]:
    from sklearn.cluster import MiniBatchKMeans

    from labelnext.ops.cluster.kmeans import train_kmeans

    n = cluster_cfg.train_sample * k
    x = kmeans_data(emb, n)
    outs, t = interleaved({
        "faiss": lambda: train_kmeans(x, k, cluster_cfg, use_gpu=False)[0],
        "sklearn": lambda: MiniBatchKMeans(n_clusters=k, random_state=cluster_cfg.seed, n_init=1).fit(x).cluster_centers_,
    }, rounds)
    (i_f, c_f), (i_s, c_s) = objectives(x, outs["faiss"]), objectives(x, outs["sklearn"])
    return [
        Row(f"k-means time, n={n:,} x {x.shape[1]}, k={k}", f"{t['sklearn']:.2f}s (MiniBatchKMeans)",
            f"{t['faiss']:.2f}s (faiss train_kmeans, niter {cluster_cfg.niter})",
            f"{t['sklearn'] / t['faiss']:.2f}x faster", f"best of {rounds}"),
        Row("k-means inertia, squared L2 (lower is better)", f"{i_s:.1f}", f"{i_f:.1f}", f"{i_f / i_s:.3f}",
            "faiss is spherical: unit-norm centroids pay a small L2 penalty"),
        Row("k-means cosine objective, sum 1-cos (lower is better)", f"{c_s:.1f}", f"{c_f:.1f}",
            f"{c_f / c_s:.3f}", "the distance the pipeline assigns by"),
    ]


# -- 3 + 4. end to end ------------------------------------------------------------------------------------
@dataclass
class E2E:
    n_docs: int
    wall_s: float
    peak_rss_mib: float
    report: dict[str, Any]


def peak_rss_of(proc: subprocess.Popen) -> float:
    """Poll the driver process's RSS until it exits; returns the peak in MiB (children not included)."""
    import psutil

    peak = 0
    try:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, ps.memory_info().rss)
            time.sleep(POLL_S)
    except psutil.NoSuchProcess:
        pass
    proc.wait()
    return peak / 2**20


def run_e2e(n_docs: int, budget: int, overrides: list[str], work: Path) -> E2E:
    from labelnext.pipelines.sample_corpus import write_sample_corpus

    corpus = write_sample_corpus(work / f"corpus-{n_docs}.parquet", n_docs)
    output = work / f"runs-{n_docs}"
    shutil.rmtree(output, ignore_errors=True)  # cold run: no embedding cache or ledger from an earlier bench
    run_id = f"bench-{n_docs}-{int(time.time())}"
    exe = Path(sys.executable).with_name("labelnext")
    cmd = [str(exe) if exe.exists() else "labelnext", "run", "--corpus", str(corpus), "--output", str(output),
           "--budget", str(budget), "--run-id", run_id]
    for item in overrides:
        cmd += ["--set", item]
    log(f"e2e: {' '.join(cmd[1:])}")
    logfile = work / f"run-{n_docs}.log"
    with open(logfile, "w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ})
        peak = peak_rss_of(proc)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = logfile.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"labelnext run failed (rc {proc.returncode}) at N={n_docs}: {' | '.join(tail)}")
    reports = sorted(output.glob(f"run_date=*/run_id={run_id}/cost_report.json"))
    if not reports:
        raise RuntimeError(f"no cost_report.json under {output} for run {run_id}")
    return E2E(n_docs, wall, peak, json.loads(reports[-1].read_text()))


def _stage_s(report: dict[str, Any], name: str) -> float:
    return float(report.get("stages", {}).get(name, {}).get("wall_s", float("nan")))


def e2e_rows(runs: list[E2E], budget: int) -> list[Row]:
    small, big = runs[0], runs[-1]
    scale = big.n_docs / small.n_docs
    per_doc = [r.wall_s / r.n_docs * 1e3 for r in (small, big)]
    embed_per_doc = [_stage_s(r.report, "embed") / r.n_docs * 1e3 for r in (small, big)]
    usd = [float(r.report.get("total_usd", float("nan"))) for r in (small, big)]
    label = f"N={small.n_docs:,} -> {big.n_docs:,} ({scale:g}x docs)"
    return [
        Row(f"end to end wall, {label}", f"{small.wall_s:.1f}s", f"{big.wall_s:.1f}s",
            f"{big.wall_s / small.wall_s:.2f}x", "linear or better: <= docs ratio (fixed costs amortise)"),
        Row("end to end ms per doc", f"{per_doc[0]:.2f}", f"{per_doc[1]:.2f}", f"{per_doc[1] / per_doc[0]:.2f}x",
            "<= 1.0x: cost per doc does not grow with N"),
        Row("embed stage ms per doc", f"{embed_per_doc[0]:.2f}", f"{embed_per_doc[1]:.2f}",
            f"{embed_per_doc[1] / embed_per_doc[0]:.2f}x", "~1.0x: the O(N) stage is linear"),
        Row("total_usd (cost report)", f"${usd[0]:.5f}", f"${usd[1]:.5f}", f"{usd[1] / usd[0]:.2f}x",
            f"budget fixed at {budget}: LLM cost constant, O(N) stages linear"),
        Row("peak driver RSS", f"{small.peak_rss_mib:.0f} MiB", f"{big.peak_rss_mib:.0f} MiB",
            f"{big.peak_rss_mib / small.peak_rss_mib:.2f}x", "~1.0x: driver memory flat in N"),
    ]


def savings_rows(runs: list[E2E]) -> list[Row]:
    rows = []
    for r in runs:
        rep = r.report
        full = rep.get("counterfactuals", {}).get("full_pass_scoring_model_usd", float("nan"))
        corpus = rep.get("corpus", {})
        rows.append(Row(f"cost vs full LLM pass, N={r.n_docs:,}", f"${float(full):.5f} (LLM over every doc)",
                        f"${float(rep.get('total_usd', float('nan'))):.5f} (labelnext run)",
                        f"{float(rep.get('savings_ratio', float('nan'))):.1f}x cheaper",
                        f"scored {corpus.get('scored_docs', '?')} of {corpus.get('accepted_docs', '?')} docs"))
    return rows


# -- main -------------------------------------------------------------------------------------------------
def render(rows: list[Row], notes: list[str], quick: bool) -> str:
    table = markdown_table(["measure", "baseline", "labelnext", "ratio", "note"],
                           [[r.measure, r.baseline, r.candidate, r.ratio, r.note] for r in rows])
    head = [f"# Throughput{' (--quick)' if quick else ''}", "", f"Machine: {machine_description()}.",
            "Timings are noisy on a shared machine; every ratio compares two measurements from the same run.", ""]
    return "\n".join(head + [table, ""] + [f"- {n}" for n in notes if n]) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    p.add_argument("--skip-e2e", action="store_true", help="only the embed and k-means figures")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override forwarded to `labelnext run` (repeatable)")
    p.add_argument("--out", type=Path, default=OUT / "throughput.md")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    setup_env()
    from labelnext.pipelines.config import load_config

    sizes = QUICK if args.quick else FULL
    cfg = load_config()
    texts, source = bench_texts(sizes.embed_docs)
    log(f"embed: {source}")
    rows, emb = bench_embed(texts, cfg.embed, sizes.rounds)
    log("k-means")
    rows += bench_kmeans(emb, sizes.kmeans_k, cfg.cluster, sizes.rounds)
    notes = [f"embed documents: {source}."]
    if not args.skip_e2e:
        work = OUT / "e2e"
        try:
            runs = [run_e2e(n, sizes.e2e_budget, args.overrides, work) for n in sizes.e2e]
            rows += e2e_rows(runs, sizes.e2e_budget) + savings_rows(runs)
            backend = runs[-1].report.get("stages", {}).get("score", {}).get("backend", "?")
            notes.append(f"end to end: `labelnext run --budget {sizes.e2e_budget}` (score backend {backend}, "
                         f"overrides {args.overrides or 'none'}) on the generated demo corpus "
                         f"({', '.join(str(n) for n in sizes.e2e)} docs), driver RSS polled every {POLL_S}s.")
        except (RuntimeError, FileNotFoundError) as exc:
            notes.append(f"end to end not measured: {exc}")
    text = render(rows, notes, args.quick)
    publish(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
