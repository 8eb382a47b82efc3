"""Score stage throughput: the ``Scorer`` (both backends) and the Ray-wrapped ``score_dataset`` against two
baselines measured in the same run on the same documents and token ids.

Baselines:
- bare vLLM: ``vllm.LLM.generate`` with ``prompt_logprobs=1`` and ``max_tokens=1`` (what scoring with vLLM's
  sampling API gives: the target's log-prob and the top-1, not the entropy over the vocabulary);
- bare transformers: a ``model(input_ids).logits`` loop, one document per forward, no entropy.

Tokens are model input positions (BOS included) after truncation to ``score.max_tokens``; every method sees
the same ids. Engine start-up is timed separately ("init s"); tokens/s is the best of ``--rounds`` steady
scoring passes (the load average is printed: on a shared machine the figures move with it). The Ray rows
are one pass (actor start-up included) and the marginal rate of a pass three times as long (start-up excluded). The stage's exact entropy is also checked across backends:
max |vLLM - transformers| per document. The fused output head (``score.fused_head``) is printed as ratios
against the current path measured in the same run: the whole Scorer with it on and off, and the head +
entropy alone on the model's real hidden states.

    python -m bench.score            # 240 docs, max_tokens 512
    python -m bench.score --quick    # 48 docs, max_tokens 256
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    OUT, SHARED_DATA, SHARED_DATA_DISPLAY, log, machine_description, markdown_table, setup_env, stopwatch,
)

SEED = 0


def best_of(rounds: int, fn) -> float:
    """Fastest of ``rounds`` timed calls: the least disturbed by other work on the machine."""
    times = []
    for _ in range(rounds):
        with stopwatch() as t:
            fn()
        times.append(t[0])
    return min(times)


@dataclass
class Row:
    method: str
    backend: str
    init_s: float
    score_s: float
    tokens: int
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.score_s if self.score_s > 0 else float("nan")


# -- documents ------------------------------------------------------------------------------------------
def load_texts(n: int) -> tuple[list[str], str]:
    """``n`` documents drawn evenly from the labelled Parquet files, or generated ones when absent."""
    import pyarrow.parquet as pq

    files = sorted(SHARED_DATA.glob("*.parquet")) if SHARED_DATA.is_dir() else []
    if not files:
        from labelnext.pipelines.sample_corpus import make_documents

        log(f"no Parquet files in {SHARED_DATA_DISPLAY}: using {n} generated demo documents instead")
        texts = [t for t in make_documents(n + 50, seed=SEED).column("text").to_pylist() if t and t.strip()]
        return texts[:n], "generated demo corpus (pipelines.sample_corpus)"
    rng = np.random.default_rng(SEED)
    texts: list[str] = []
    per_file = -(-n // len(files))
    for f in files:
        col = [t for t in pq.read_table(f, columns=["text"]).column("text").to_pylist() if t and t.strip()]
        texts += [col[i] for i in rng.choice(len(col), size=min(per_file, len(col)), replace=False)]
    rng.shuffle(texts)
    return texts[:n], ", ".join(f.name for f in files) + f" from {SHARED_DATA_DISPLAY}"


# -- methods --------------------------------------------------------------------------------------------
def bench_scorer(cfg, texts: list[str], tokens: int, rounds: int, device: str, cpus: int) -> tuple[Row, dict]:
    from labelnext.ops.score.scorer import Scorer

    with stopwatch() as t_init:
        scorer = Scorer(cfg, device, num_cpus=cpus)
        scorer({"doc_id": np.arange(2), "text": np.array(texts[:2], dtype=object)})  # warm-up
    batch = {"doc_id": np.arange(len(texts)), "text": np.array(texts, dtype=object)}
    out: dict = {}
    seconds = best_of(rounds, lambda: out.update(scorer(dict(batch))))
    backend = scorer.backend
    scorer.close()
    del scorer
    gc.collect()
    label = "Scorer (exact entropy)" + ("" if cfg.fused_head == "auto" else f", score.fused_head={cfg.fused_head}")
    return Row(label, backend, t_init[0], seconds, tokens), out


def bench_fused_head(model_dir: str, ids: list[list[int]], device: str, dtype, rounds: int) -> dict:
    """The score forward's post-body part alone, on the model's real final hidden states of these documents:
    today's path (the head's whole logit rows for a chunk of positions, then the entropy) against the fused
    head (vocabulary in tiles, online log-sum-exp), in the same process on the same tensors."""
    import torch
    from transformers import AutoModelForCausalLM

    from labelnext.ops.score.entropy import hidden_entropy_nll
    from labelnext.ops.score.fused_head import fused_entropy_nll, tiles_for
    from labelnext.ops.score.head import OutputHead
    from labelnext.ops.score.scorer import _CPU_LOGIT_CHUNK_BYTES, _GPU_LOGIT_CHUNK_BYTES

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    head = OutputHead.from_model(model)
    body = model.get_decoder()
    with torch.inference_mode():
        hidden = torch.cat([body(input_ids=torch.tensor([s], device=device)).last_hidden_state[0, :-1]
                            for s in ids])
    targets = torch.cat([torch.tensor(s[1:]) for s in ids]).to(device)
    del model, body
    gc.collect()
    chunk_bytes = _CPU_LOGIT_CHUNK_BYTES if device == "cpu" else _GPU_LOGIT_CHUNK_BYTES
    chunk = max(16, chunk_bytes // (4 * head.vocab_size))  # the Scorer's chunk of positions
    out: dict = {}
    with torch.inference_mode():
        current = best_of(rounds, lambda: out.update(
            current=hidden_entropy_nll(hidden, targets, head=head, chunk=chunk)))
        fused = best_of(rounds, lambda: out.update(fused=fused_entropy_nll(hidden, targets, head)))
        # The same hidden states rounded to bf16 (a bf16 body's output): the deviation that rounding costs.
        bf16 = fused_entropy_nll(hidden.bfloat16(), targets, head)
    delta = max(float((a - b).abs().max()) for a, b in zip(out["current"], out["fused"]))
    bf16_delta = max(float((a - b).abs().max()) for a, b in zip(out["current"], bf16))
    tiles = tiles_for(device)
    return dict(positions=int(hidden.shape[0]), vocab=head.vocab_size, hidden_dtype=str(hidden.dtype)[6:],
                current_s=current, fused_s=fused, chunk=chunk, tiles=f"{tiles.rows} x {tiles.vocab}",
                max_delta=delta, bf16_max_delta=bf16_delta)


def bench_bare_hf(model_dir: str, ids: list[list[int]], device: str, dtype, rounds: int) -> Row:
    import torch
    from transformers import AutoModelForCausalLM

    with stopwatch() as t_init:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    def loop() -> None:
        for seq in ids:
            model(torch.tensor([seq], device=device)).logits.float().cpu()

    with torch.inference_mode():
        model(torch.tensor([ids[0]], device=device))  # warm-up
        seconds = best_of(rounds, loop)
    del model
    gc.collect()
    return Row("bare transformers forward loop (logits only)", "transformers", t_init[0], seconds,
               sum(map(len, ids)))


def bench_bare_vllm(model_dir: str, ids: list[list[int]], cfg, device: str, rounds: int) -> Row:
    from labelnext.ops.score.backend_vllm import apply_env_defaults

    apply_env_defaults(device)  # the same KV-cache and logging defaults as the stage
    from vllm import LLM, SamplingParams

    kwargs = dict(model=model_dir, dtype=meta_dtype(cfg.dtype, device),
                  max_model_len=max(map(len, ids)) + 1, enable_prefix_caching=False, seed=SEED)
    if device == "cpu":
        kwargs["enforce_eager"] = True
    else:
        kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization)
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    with stopwatch() as t_init:
        llm = LLM(**kwargs)
        llm.generate([{"prompt_token_ids": ids[0]}], params, use_tqdm=False)  # warm-up
    prompts = [{"prompt_token_ids": s} for s in ids]
    seconds = best_of(rounds, lambda: llm.generate(prompts, params, use_tqdm=False))
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return Row("bare vLLM generate, prompt_logprobs=1 (top-1 + target only)", "vllm", t_init[0], seconds,
               sum(map(len, ids)))


def bench_ray(cfg, texts: list[str], tokens: int, cpus: int, device: str) -> list[Row]:
    """Two passes through ``score_dataset``: the documents once, then three times over (new ids). The first
    pass is what a small run pays (actor start-up and model load included); the difference between them is
    the stage's marginal throughput, the figure a large run sees."""
    import ray

    from labelnext.ops.core.quiet import worker_env
    from labelnext.ops.score.scorer import score_dataset

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": worker_env()})
    seconds = {}
    try:
        for copies in (1, 3):
            rows = [{"doc_id": f"{c}-{i}", "text": t} for c in range(copies) for i, t in enumerate(texts)]
            ds = ray.data.from_items(rows)
            with stopwatch() as t:
                out = score_dataset(ds, cfg, use_gpu=device == "cuda", concurrency=1, num_gpus=1.0 if device == "cuda" else 0.0,
                                    num_cpus=1.0).to_pandas()
            assert len(out) == len(rows)
            seconds[copies] = t[0]
    finally:
        ray.shutdown()
    return [
        Row("score_dataset (Ray Data, 1 actor), one pass, start-up included", cfg.backend, float("nan"),
            seconds[1], tokens),
        Row("score_dataset (Ray Data, 1 actor), marginal: 3x docs minus 1x", cfg.backend, float("nan"),
            seconds[3] - seconds[1], 2 * tokens),
    ]


def meta_dtype(dtype: str, device: str) -> str:
    from labelnext.ops.score.scorer import resolve_dtype

    return str(resolve_dtype(dtype, device)).removeprefix("torch.")


def reference_scores(model_dir: str, texts: list[str], window: int, truncation: str, device: str) -> dict:
    """Per-document scores computed the textbook way, sharing no code with the stage: a float32 HF model's
    full ``logits``, then float64 ``Categorical(logits).entropy()`` and ``cross_entropy``."""
    import torch
    from transformers import AutoModelForCausalLM

    from labelnext.ops.score.scorer import load_tokenizer
    from labelnext.ops.score.inputs import encode

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    enc = encode(load_tokenizer(model_dir), texts, window=window, truncation=truncation)
    cols: dict[str, list[float]] = {"uncertainty": [], "max_entropy": [], "nll": []}
    with torch.inference_mode():
        for ids in enc.ids:
            if len(ids) < 2:
                for c in cols:
                    cols[c].append(float("nan"))
                continue
            logits = model(torch.tensor([ids], device=device)).logits[0, :-1].double()
            ent = torch.distributions.Categorical(logits=logits).entropy()
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], device=device), reduction="none")
            cols["uncertainty"].append(ent.mean().item())
            cols["max_entropy"].append(ent.max().item())
            cols["nll"].append(nll.mean().item())
    del model
    gc.collect()
    return {c: np.array(v) for c, v in cols.items()}


def max_abs_diff(a: dict, b: dict) -> dict:
    out = {}
    for c in ("uncertainty", "max_entropy", "nll"):
        d = np.abs(np.asarray(a[c], np.float64) - np.asarray(b[c], np.float64))
        out[c], out[c + "_mean"] = float(np.nanmax(d)), float(np.nanmean(d))
    return out


# -- report ---------------------------------------------------------------------------------------------
def _fmt(x: float, digits: int = 1) -> str:
    return "-" if x != x else f"{x:,.{digits}f}"


def render_fused(rows: list[Row], head: Optional[dict]) -> list[str]:
    """The fused head as ratios against the current path measured in the same run."""
    if head is None:
        return []
    default = next((r for r in rows if r.method == "Scorer (exact entropy)" and r.backend == "transformers"), None)
    other = next((r for r in rows if "score.fused_head=" in r.method), None)
    on, off = (other, default) if other and other.method.endswith("=on") else (default, other)
    lines = [
        f"Fused head and entropy, head + entropy only ({head['positions']:,} positions of {head['hidden_dtype']} "
        f"hidden states, vocabulary {head['vocab']:,}): current path (chunks of {head['chunk']} positions x the "
        f"whole vocabulary) {head['current_s']:.2f} s, fused ({head['tiles']} tiles) {head['fused_s']:.2f} s: "
        f"**{head['current_s'] / head['fused_s']:.2f}x**; max |fused - current| per position {head['max_delta']:.1e} "
        f"nats (the same hidden states rounded to bf16 first: {head['bf16_max_delta']:.1e}).",
        "",
    ]
    if on and off:
        lines += [f"Fused head and entropy, whole Scorer: score.fused_head on {on.tokens_per_s:,.1f} tokens/s vs off "
                  f"{off.tokens_per_s:,.1f}: **{on.tokens_per_s / off.tokens_per_s:.2f}x**.", ""]
    return lines


def render(rows: list[Row], agreement: dict, meta: dict, head: Optional[dict] = None) -> str:
    base_vllm = next((r.tokens_per_s for r in rows if r.method.startswith("bare vLLM")), float("nan"))
    base_hf = next((r.tokens_per_s for r in rows if r.method.startswith("bare transformers")), float("nan"))
    table = markdown_table(
        ["method", "backend", "init s", "score s", "tokens", "tokens/s", "x bare vLLM", "x bare transformers"],
        [[r.method, r.backend, _fmt(r.init_s), _fmt(r.score_s), f"{r.tokens:,}", _fmt(r.tokens_per_s),
          _fmt(r.tokens_per_s / base_vllm, 2), _fmt(r.tokens_per_s / base_hf, 2)] for r in rows],
    )
    lines = [
        "## Score stage throughput" + (" (--quick)" if meta["quick"] else ""),
        "",
        f"Machine: {meta['machine']}. Model: {meta['model']} ({meta['dtype']} on {meta['device']}), "
        f"max_tokens {meta['max_tokens']}. Documents: {meta['docs']} from {meta['source']}; "
        f"{meta['tokens']:,} input tokens. Best of {meta['rounds']} passes; 1-min load average "
        f"{meta['load_before']:.1f} before, {meta['load_after']:.1f} after.",
        "",
        table,
        "",
    ]
    for name, diff in agreement.items():
        lines += [
            f"Exact entropy, {name}: |delta| per document, max (mean) over the documents: mean entropy "
            f"{diff['uncertainty']:.2e} ({diff['uncertainty_mean']:.1e}) nats, max entropy {diff['max_entropy']:.2e} "
            f"({diff['max_entropy_mean']:.1e}), NLL {diff['nll']:.2e} ({diff['nll_mean']:.1e}).",
            "",
        ]
    return "\n".join(lines + render_fused(rows, head))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="48 documents, max_tokens 256")
    p.add_argument("--docs", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--rounds", type=int, help="timed passes per method, best kept (default 2 quick, 3 full)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray-wrapped row")
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM rows (transformers only)")
    p.add_argument("--no-fused", action="store_true",
                   help="skip the fused head rows (the Scorer with the other score.fused_head, head + entropy alone)")
    p.add_argument("--dtype", default="auto", help="score.dtype: auto (bfloat16 on GPU, float32 on CPU), float32, ...")
    p.add_argument("--model", help="score.model (default: the bundled SmolLM2); a .gguf path or a checkpoint dir")
    p.add_argument("--out", type=Path, default=OUT / "score.md")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    setup_env()
    import torch

    from labelnext.ops.core.model_prep import prepare_model
    from labelnext.ops.score.scorer import load_tokenizer, model_window, resolve_device, resolve_dtype
    from labelnext.ops.score.settings import on_for
    from labelnext.ops.score.inputs import encode
    from labelnext.ops.score.backend_vllm import vllm_available
    from labelnext.pipelines.config import ScoreConfig

    load_before = os.getloadavg()[0]
    n_docs = args.docs or (48 if args.quick else 240)
    rounds = args.rounds or (2 if args.quick else 3)
    max_tokens = args.max_tokens or (256 if args.quick else 512)
    device = resolve_device("auto")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Every in-process method uses the same CPU threads.
    torch.set_num_threads(cpus)
    base = ScoreConfig(max_tokens=max_tokens, dtype=args.dtype,
                       **({"model": args.model} if args.model else {}))
    model_dir = prepare_model(base.model, base.cache_dir)
    texts, source = load_texts(n_docs)
    tokenizer = load_tokenizer(model_dir)
    ids = [s for s in encode(tokenizer, texts, window=model_window(model_dir, max_tokens),
                             truncation=base.truncation).ids if len(s) >= 2]
    tokens = sum(map(len, ids))
    log(f"{len(texts)} docs, {tokens:,} input tokens, device {device}, {cpus} CPU threads")
    use_vllm = vllm_available() and not args.no_vllm

    rows: list[Row] = []
    log("bare transformers forward loop")
    rows.append(bench_bare_hf(model_dir, ids, device, resolve_dtype(base.dtype, device), rounds))
    log("Scorer, transformers backend")
    row, hf_out = bench_scorer(base.model_copy(update={"backend": "transformers"}), texts, tokens, rounds, device, cpus)
    rows.append(row)
    head = None
    if not args.no_fused:
        # The row above runs the device's default (auto: fused on GPU, not on CPU); this one the other path.
        other = "off" if on_for("auto", device) else "on"
        log(f"Scorer, transformers backend, score.fused_head={other}")
        rows.append(bench_scorer(base.model_copy(update={"backend": "transformers", "fused_head": other}),
                                 texts, tokens, rounds, device, cpus)[0])
        log("fused head vs current path, head + entropy only")
        head = bench_fused_head(model_dir, ids, device, resolve_dtype(base.dtype, device), rounds)
    log("independent reference (float32 logits, float64 Categorical entropy)")
    ref = reference_scores(model_dir, texts, model_window(model_dir, max_tokens), base.truncation, device)
    agreement = {f"Scorer transformers ({meta_dtype(base.dtype, device)} on {device}) vs reference": max_abs_diff(hf_out, ref)}
    if use_vllm:
        log("Scorer, vLLM backend")
        row, vllm_out = bench_scorer(base.model_copy(update={"backend": "vllm"}), texts, tokens, rounds, device, cpus)
        rows.append(row)
        agreement[f"Scorer vLLM ({meta_dtype(base.dtype, device)} on {device}) vs reference"] = max_abs_diff(vllm_out, ref)
        agreement["Scorer vLLM vs Scorer transformers"] = max_abs_diff(vllm_out, hf_out)
        if not (vllm_out["n_tokens"] == hf_out["n_tokens"]).all():
            raise SystemExit("vLLM and transformers backends saw different token counts")
        log("bare vLLM generate with prompt_logprobs")
        rows.append(bench_bare_vllm(model_dir, ids, base, device, rounds))
    else:
        log("vLLM not importable (or --no-vllm): skipping vLLM rows")
    if not args.no_ray:
        ray_backend = "vllm" if use_vllm else "transformers"
        log(f"score_dataset on local Ray ({ray_backend})")
        rows += bench_ray(base.model_copy(update={"backend": ray_backend}), texts, tokens, cpus, device)

    meta = dict(quick=args.quick, machine=machine_description(), model=base.model, device=device,
                dtype=meta_dtype(base.dtype, device), max_tokens=max_tokens,
                docs=len(texts), source=source, tokens=tokens, rounds=rounds, load_before=load_before,
                load_after=os.getloadavg()[0])
    text = render(rows, agreement, meta, head)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "agreement": agreement, "fused_head": head,
         "rows": [{**r.__dict__, "tokens_per_s": r.tokens_per_s} for r in rows]}, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
