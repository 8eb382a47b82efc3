"""GPU stages against simple ceilings on the same device, in one run: embed docs/s and score tokens/s.

Runs where only torch, transformers and sentence-transformers (plus numpy and pydantic) are installed: no Ray,
FAISS, vLLM or network. It imports the stages' plain classes (``labelnext.ops.embed.encoder.Embedder``,
``labelnext.ops.embed.tokenize.EncoderTokenizer``, ``labelnext.ops.score.scorer.Scorer``, transformers backend) and, when
``labelnext`` is not installed, loads them straight from this checkout.

    python -m bench.gpu --export-configs bench/out/gpu-inputs        # here: configs, tokenizers, documents
    python -m bench.gpu --random-weights --encoder-dir bench/out/gpu-inputs/encoder \\
        --llm-dir bench/out/gpu-inputs/llm --data bench/out/gpu-inputs/docs.jsonl   # on the GPU machine

``--random-weights`` builds the real architectures from ``config.json`` with random weights (speed does not
depend on the weights; the agreement rows then measure precision on random weights). Without it the folders
must hold weights. ``--smoke`` runs every row on a few documents (CPU is fine) to check the script itself.
Every speed figure is a ratio against a measurement made in the same run on the same documents.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import OUT, SHARED_DATA, gpu_description, log, markdown_table, publish  # noqa: E402

# Weights and other large binaries are not exported: the GPU machine rebuilds the architectures from config.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf", ".h5", ".msgpack", ".ot")
EMBED_MIN_COSINE = 0.999  # fp16 vs fp32 vectors, the bound
SCORE_TOL_NATS = 1e-3     # float32 Scorer vs float64 reference


def ensure_labelnext() -> None:
    """Make ``labelnext.ops`` importable from this checkout when the package is not installed."""
    # A process that ran this once already holds the stand-in package, whose __spec__ is None.
    if "labelnext" in sys.modules or importlib.util.find_spec("labelnext") is not None:
        return
    package = types.ModuleType("labelnext")
    package.__path__ = []
    sys.modules["labelnext"] = package
    spec = importlib.util.spec_from_file_location("labelnext.ops", ROOT / "ops" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "ops")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["labelnext.ops"] = module
    spec.loader.exec_module(module)
    package.ops = module


@dataclass
class Row:
    what: str
    rate: float           # docs/s or tokens/s
    unit: str
    vs: str = ""          # "ratio x name" filled in by ratios()
    note: str = ""


class RowLog(list):
    """Rows as measured, each also logged: a run cut short by a time limit still shows what it measured."""

    def append(self, row: Row) -> None:
        log(f"  {row.what}: {row.rate:,.0f} {row.unit}")
        super().append(row)


# -- inputs -----------------------------------------------------------------------------------------------
def load_texts(source: Optional[Path], n: int, seed: int = 0) -> tuple[list[str], str]:
    """``n`` texts from a ``.jsonl`` file (``{"text": ...}`` per line) or a folder of Parquet files."""
    if source is None and not any(SHARED_DATA.glob("*.parquet")):
        ensure_labelnext()
        from labelnext.pipelines.sample_corpus import make_documents

        texts = [t for t in make_documents(n, seed=seed).column("text").to_pylist() if t and t.strip()]
        return texts[:n], f"{min(n, len(texts))} generated demo docs"
    source = source or SHARED_DATA
    if source.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in source.read_text().splitlines() if line.strip()]
    else:
        import pyarrow.parquet as pq

        files = sorted(source.glob("*.parquet"))
        if not files:
            raise SystemExit(f"error: no documents: {source} has no *.parquet (pass --data FILE.jsonl)")
        texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist() if t]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(texts), min(n, len(texts)), replace=False)
    return [texts[i] for i in picked], f"{len(picked)} docs from {source.name}"


def export_inputs(out: Path, n_docs: int) -> None:
    """Configs and tokenizers of the bundled models (no weights) and documents as JSONL, for the GPU machine."""
    ensure_labelnext()
    from labelnext.ops.core.model_prep import BUNDLED_ENCODER, BUNDLED_LLM, prepare_model, resolve_encoder_path

    out.mkdir(parents=True, exist_ok=True)
    for name, src in (("encoder", resolve_encoder_path(BUNDLED_ENCODER)), ("llm", prepare_model(BUNDLED_LLM))):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(src, out / name, ignore=lambda _d, names: [n for n in names if n.endswith(_WEIGHT_SUFFIXES)])
    texts, source = load_texts(None, n_docs)
    with open(out / "docs.jsonl", "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    log(f"exported encoder/, llm/ (configs and tokenizers) and docs.jsonl ({source}) to {out}")


def with_random_weights(src: Path, work: Path, causal: bool, layers: Optional[int] = None) -> Path:
    """A copy of ``src`` with weights initialised from its config (seeded), in the layout its loader expects;
    ``layers`` overrides the depth (the smoke run's small models)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from labelnext.ops.embed.tokenize import _transformer_dir

    dst = work / src.name
    shutil.copytree(src, dst, ignore=lambda _d, names: [n for n in names if n.endswith(_WEIGHT_SUFFIXES)])
    target = dst if causal else _transformer_dir(dst)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(str(target))
    if layers:
        config.num_hidden_layers = layers
    model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    model.save_pretrained(str(target))
    return dst


# -- timing -----------------------------------------------------------------------------------------------
def best_of(rounds: int, fn: Callable[[], object], device: str) -> tuple[float, object]:
    import torch

    best, out = float("inf"), None
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


# -- embed ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=2)
def _worker_tokenizer(model: str, max_seq_length: int):
    ensure_labelnext()  # spawned workers start from a fresh interpreter
    from labelnext.ops.embed.tokenize import EncoderTokenizer

    return EncoderTokenizer.for_encoder(model, max_seq_length)


def _tokenize_chunk(model: str, max_seq_length: int, texts: list[str]) -> list[np.ndarray]:
    return _worker_tokenizer(model, max_seq_length)(texts)


def _score_tokenize_chunk(settings: str, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
    ensure_labelnext()  # spawned workers start from a fresh interpreter
    from labelnext.ops.score.scorer import score_tokenizer_for

    enc = score_tokenizer_for(settings)(texts)
    return enc.ids, enc.truncated


def _chunks(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def bench_embed(texts: list[str], encoder: str, device: str, rounds: int, workers: int) -> tuple[list[Row], dict]:
    import copy

    import torch
    from sentence_transformers import SentenceTransformer

    from labelnext.ops.embed import encoder as emb
    from labelnext.ops.embed.encoder import EmbedConfig, Embedder, resolve_encoder_path
    from labelnext.ops.embed.tokenize import EncoderTokenizer

    cfg = EmbedConfig(model=encoder)
    n = len(texts)
    product = Embedder(cfg, device=device)
    fp32 = Embedder(cfg.model_copy(update={"dtype": "float32", "batch_size": 256}), device=device)
    tokenizer = EncoderTokenizer.for_encoder(encoder, cfg.max_seq_length)
    ids = tokenizer(texts)
    mean_tokens = float(np.mean([len(i) for i in ids]))
    rows = RowLog()

    t, _ = best_of(rounds, lambda: tokenizer(texts), "cpu")
    rows.append(Row("tokenisation, one fast-tokenizer call, one process", n / t, "docs/s"))
    if device == "cuda":
        # The run's Ray batches, and enough of them (texts repeated) to keep every worker busy in a pipeline.
        chunk = emb.ray_batch_docs(cfg, use_gpu=True)
        stage_texts = texts * -(-4 * workers * chunk // n)
    else:
        chunk, stage_texts = max(8, n // (4 * workers)), texts
    # Spawned before the timed runs so process start-up is not counted (the stage's workers are long-lived).
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        warm = _chunks(texts, 8)[:workers]
        list(pool.map(_tokenize_chunk, [encoder] * len(warm), [cfg.max_seq_length] * len(warm), warm))

        def tokenize_parallel() -> list[np.ndarray]:
            parts = pool.map(_tokenize_chunk,
                             *zip(*[(encoder, cfg.max_seq_length, c) for c in _chunks(stage_texts, chunk)]))
            return [i for part in parts for i in part]

        def stage() -> np.ndarray:
            # The run's shape: tokenize tasks on CPU workers feed the encoder, which starts on the first chunk
            # while later ones are still being tokenised.
            futures = [pool.submit(_tokenize_chunk, encoder, cfg.max_seq_length, c)
                       for c in _chunks(stage_texts, chunk)]
            return np.concatenate([product.encode_ids(f.result()) for f in futures])

        t, _ = best_of(rounds, tokenize_parallel, "cpu")
        rows.append(Row(f"tokenize stage ({workers} CPU worker processes)", len(stage_texts) / t, "docs/s",
                        note=f"{chunk} docs per task"))
        product.encode_ids(ids[:64])
        t, staged = best_of(rounds, stage, device)
        rows.append(Row(f"embed stage: tokenize workers -> Embedder.encode_ids ({str(product.dtype)[6:]}, "
                        f"{product.batch_tokens} tokens/batch)", len(stage_texts) / t, "docs/s",
                        note=f"tokenisation included, {chunk} docs per call, {len(stage_texts)} docs"))
        staged = staged[:n]

    t, product_out = best_of(rounds, lambda: product.encode(texts), device)
    rows.append(Row("Embedder.encode(texts), one process (tokenises in line)", n / t, "docs/s"))
    t, _ = best_of(rounds, lambda: product.encode_ids(ids), device)
    rows.append(Row("Embedder.encode_ids, pre-tokenised", n / t, "docs/s"))
    fp32.encode(texts[:64])
    t, ref = best_of(rounds, lambda: fp32.encode(texts), device)
    rows.append(Row("Embedder, float32, batch_size 256", n / t, "docs/s"))

    bare = SentenceTransformer(resolve_encoder_path(encoder), device=device)
    bare.max_seq_length = product.model.max_seq_length
    bare.encode(texts[:32], batch_size=32)
    t, _ = best_of(rounds, lambda: bare.encode(texts, batch_size=32, normalize_embeddings=True,
                                               show_progress_bar=False), device)
    rows.append(Row("bare SentenceTransformer.encode, batch 32, float32", n / t, "docs/s"))

    body = copy.deepcopy(bare[0].auto_model).to(device, torch.float16 if device == "cuda" else torch.float32).eval()
    embed_ceiling(body, ids[:64], device)
    t, _ = best_of(rounds, lambda: embed_ceiling(body, ids, device), device)
    rows.append(Row(f"ceiling: pre-tokenised, length-sorted batches of <= 65,536 padded tokens, fp16 "
                    f"(mean {mean_tokens:.0f} tokens/doc)", n / t, "docs/s"))

    cosine = np.sum(product_out * ref, axis=1)
    staged_cos = np.sum(staged * ref, axis=1)
    agreement = {"embed_min_cosine_vs_fp32": float(min(cosine.min(), staged_cos.min())),
                 "embed_dtype": str(product.dtype).removeprefix("torch.")}
    del product, fp32, bare, body
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows, agreement


def embed_ceiling(body, ids: list[np.ndarray], device: str, budget: int = 65536) -> np.ndarray:
    """The simplest fast encoder loop: the (fp16) transformer body, batches by padded tokens, masked mean
    pooling and normalisation on the device."""
    import torch

    order = np.argsort([-len(i) for i in ids], kind="stable")
    out = torch.empty((len(ids), body.config.hidden_size), device=device)
    start = 0
    with torch.inference_mode():
        while start < len(order):
            width = len(ids[order[start]])
            rows = order[start:start + max(1, budget // width)]
            batch = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                batch[r, :len(ids[i])] = torch.from_numpy(ids[i].astype(np.int64))
                mask[r, :len(ids[i])] = 1
            batch, mask = batch.to(device), mask.to(device)
            hidden = body(input_ids=batch, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1).float() / m.sum(1).float()
            out[torch.from_numpy(rows).to(device)] = torch.nn.functional.normalize(pooled, dim=1)
            start += len(rows)
    return out.cpu().numpy()


# -- score ------------------------------------------------------------------------------------------------
def bench_score(texts: list[str], llm: str, device: str, rounds: int, max_tokens: int, compile_ceiling: bool,
                workers: int) -> tuple[list[Row], dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from labelnext.ops.core.model_prep import prepare_model
    from labelnext.ops.score.scorer import Scorer, docs_per_batch, load_tokenizer
    from labelnext.ops.score.inputs import encode
    from labelnext.ops.score.settings import ScoreConfig

    base = ScoreConfig(backend="transformers", model=llm, max_tokens=max_tokens, truncation="head_tail")
    batch = {"doc_id": np.arange(len(texts)), "text": np.array(texts, dtype=object)}
    rows = RowLog()

    def in_calls(fn: Callable[[int, int], dict], per_call: int) -> dict:
        # The run's Ray batches: one call per docs_per_batch documents, as the actor pool receives them.
        parts = [fn(i, i + per_call) for i in range(0, len(texts), per_call)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def scorer_row(label: str, cfg: ScoreConfig, keep: bool = False) -> tuple:
        scorer = Scorer(cfg, device=device)
        per_call = docs_per_batch(cfg, device)
        run = lambda: in_calls(lambda a, b: scorer({k: v[a:b] for k, v in batch.items()}), per_call)  # noqa: E731
        run()  # warm-up: compilation, allocator, kernels
        t, out = best_of(rounds, run, device)
        tokens = int(out["n_tokens"].sum() + (out["n_tokens"] > 0).sum())
        note = f"batch_tokens {scorer.batch_tokens}, {'packed' if scorer.engine.packed else 'buckets'}, " \
               f"{'compiled' if scorer.engine.compiled else 'eager'}, {str(scorer.dtype)[6:]}, " \
               f"{per_call} docs per call"
        if keep:
            return Row(label, tokens / t, "tokens/s", note=note), out, scorer
        scorer.close()
        return Row(label, tokens / t, "tokens/s", note=note), out

    row, product, scorer = scorer_row("Scorer (product defaults for the device)", base, keep=True)
    rows.append(row)
    # The same Scorer on ids encoded beforehand: how much of a call is tokenisation.
    enc = scorer.tokenize(texts)
    per_call = docs_per_batch(base, device)
    t, out = best_of(rounds, lambda: in_calls(lambda a, b: scorer.score_ids(enc.ids[a:b], enc.truncated[a:b]),
                                              per_call), device)
    tokens = int(out["n_tokens"].sum() + (out["n_tokens"] > 0).sum())
    rows.append(Row("Scorer.score_ids, pre-tokenised (product defaults)", tokens / t, "tokens/s",
                    note="tokenisation not included"))
    # The run's shape on GPU: score_tokenize_batch tasks on CPU workers feed the actor (tokenisation included).
    # Four actor calls' worth keeps the tokenize workers ahead of the GPU after the first chunk.
    stage_texts = texts * -(-4 * per_call // len(texts)) if device == "cuda" else texts
    settings = base.model_dump_json()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_score_tokenize_chunk, [settings] * workers, _chunks(texts, 8)[:workers]))

        def stage() -> int:
            futures = [pool.submit(_score_tokenize_chunk, settings, c) for c in _chunks(stage_texts, per_call)]
            counts = [scorer.score_ids(*f.result())["n_tokens"] for f in futures]
            return sum(int(c.sum() + (c > 0).sum()) for c in counts)

        t, tokens = best_of(rounds, stage, device)
    rows.append(Row(f"score stage: tokenize workers -> Scorer.score_ids ({workers} CPU workers)", tokens / t,
                    "tokens/s", note=f"tokenisation included, {len(stage_texts)} docs"))
    scorer.close()
    row, _ = scorer_row("Scorer, before: batch_tokens 8,192, length buckets, eager",
                        base.model_copy(update={"batch_tokens": 8192, "packing": "off", "compile": "off"}))
    rows.append(row)
    row, f32 = scorer_row("Scorer, float32", base.model_copy(update={"dtype": "float32"}))
    rows.append(row)
    fused_rows = ("Scorer, score.fused_head=off (head's whole logit rows, then the entropy)",
                  f"fused head: the ceiling's packed 64 x {max_tokens} forward + fused head and exact entropy")
    if device == "cuda":
        row, _ = scorer_row(fused_rows[0], base.model_copy(update={"fused_head": "off"}))
        rows.append(row)

    model_dir = prepare_model(llm)
    tokenizer = load_tokenizer(model_dir)
    ids = [s for s in encode(tokenizer, texts, window=max_tokens, truncation=base.truncation).ids if len(s) >= 2]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokens = sum(map(len, ids))
    t, _ = best_of(rounds, lambda: naive_loop(model, ids, device), device)
    rows.append(Row("naive loop: padded batches of 32, Categorical(logits.float()).entropy()", tokens / t, "tokens/s"))
    eager = packed_ceiling(model, ids, device, max_tokens, compiled=False)
    t, _ = best_of(rounds, eager, device)
    rows.append(Row(f"ceiling: packed 64 x {max_tokens} forward + exact entropy, eager", tokens / t, "tokens/s"))
    if compile_ceiling:
        compiled = packed_ceiling(model, ids, device, max_tokens, compiled=True)
        compiled()
        t, _ = best_of(rounds, compiled, device)
        rows.append(Row(f"ceiling: packed 64 x {max_tokens} forward + exact entropy, torch.compile", tokens / t,
                        "tokens/s"))
    if device == "cuda":  # the acceptance: >= 1.3x the compiled ceiling
        fused = packed_ceiling(model, ids, device, max_tokens, compiled=compile_ceiling, fused=True)
        fused()
        t, _ = best_of(rounds, fused, device)
        rows.append(Row(fused_rows[1], tokens / t, "tokens/s",
                        note="body compiled" if compile_ceiling else "eager"))
    else:
        rows += [Row(what, float("nan"), "tokens/s", note="no GPU in this run") for what in fused_rows]
    del model
    reference = reference_scores(model_dir, tokenizer, texts, max_tokens, base.truncation, device)
    agreement = {}
    for name, out in (("float32", f32), (str(dtype)[6:] if device == "cuda" else "product", product)):
        for col in ("uncertainty", "nll"):
            delta = np.abs(out[col].astype(np.float64) - reference[col])
            agreement[f"score_{name}_{col}_max_abs_delta"] = float(np.nanmax(delta))
    return rows, agreement


def naive_loop(model, ids: list[list[int]], device: str) -> None:
    import torch

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    with torch.inference_mode():
        for start in range(0, len(order), 32):
            group = [ids[i] for i in order[start:start + 32]]
            width = max(map(len, group))
            batch = torch.zeros((len(group), width), dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for r, s in enumerate(group):
                batch[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits
            torch.distributions.Categorical(logits=logits.float()).entropy().sum().item()


def packed_ceiling(model, ids: list[list[int]], device: str, width: int, compiled: bool,
                   fused: bool = False) -> Callable[[], None]:
    """All tokens in one stream cut into rows of ``width`` (no document boundaries), 64 rows per forward,
    float32 head and exact entropy in chunks: what the device does with no bookkeeping at all. ``fused``: the
    head and entropy by ``fused_entropy_nll`` (vocabulary in tiles) after the body, which alone is compiled."""
    import torch

    from labelnext.ops.score.fused_head import fused_entropy_nll
    from labelnext.ops.score.head import OutputHead

    stream = torch.tensor([t for s in ids for t in s], dtype=torch.long)
    n_rows = -(-stream.numel() // width)
    rows = torch.zeros(n_rows * width, dtype=torch.long)
    rows[:stream.numel()] = stream
    rows = rows.view(n_rows, width).to(device)
    weight = model.get_output_embeddings().weight.float()
    body = model.get_decoder()

    def step(batch: torch.Tensor) -> torch.Tensor:
        hidden = body(input_ids=batch, use_cache=False).last_hidden_state.reshape(-1, weight.shape[1])
        total = torch.zeros((), device=batch.device)
        for h in hidden.split(8192):
            logits = h.float() @ weight.T
            logp = torch.log_softmax(logits, dim=-1)
            total = total + (-(logp.exp() * logp).sum(-1)).sum()
        return total

    if fused:
        head = OutputHead.from_model(model)
        forward = torch.compile(body, dynamic=False) if compiled else body

        def step(batch: torch.Tensor) -> torch.Tensor:  # noqa: F811
            hidden = forward(input_ids=batch, use_cache=False).last_hidden_state.reshape(-1, weight.shape[1])
            entropy, _ = fused_entropy_nll(hidden, batch.reshape(-1).roll(-1), head)
            return entropy.sum()

    fn = torch.compile(step, dynamic=False) if compiled and not fused else step

    def run() -> None:
        with torch.inference_mode():
            for start in range(0, n_rows, 64):
                batch = rows[start:start + 64]
                if batch.shape[0] < 64 and compiled:
                    batch = torch.cat([batch, batch.new_zeros((64 - batch.shape[0], width))])
                fn(batch)
    return run


def reference_scores(model_dir: str, tokenizer, texts: list[str], window: int, truncation: str, device: str
                     ) -> dict[str, np.ndarray]:
    """float32 model, float64 ``Categorical`` entropy and ``cross_entropy``: no code shared with the Scorer."""
    import torch
    from transformers import AutoModelForCausalLM

    from labelnext.ops.score.inputs import encode

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    out = {"uncertainty": [], "nll": []}
    with torch.inference_mode():
        for ids in encode(tokenizer, texts, window=window, truncation=truncation).ids:
            if len(ids) < 2:
                out["uncertainty"].append(np.nan)
                out["nll"].append(np.nan)
                continue
            logits = model(torch.tensor([ids], device=device)).logits[0, :-1].double()
            out["uncertainty"].append(torch.distributions.Categorical(logits=logits).entropy().mean().item())
            target = torch.tensor(ids[1:], device=device)
            out["nll"].append(torch.nn.functional.cross_entropy(logits, target).item())
    del model
    return {k: np.array(v) for k, v in out.items()}


# -- report -----------------------------------------------------------------------------------------------
def ratio_to(rows: list[Row], base: Row) -> None:
    for row in rows:
        row.vs = f"{row.rate / base.rate:.2f}x" if row.rate == row.rate else "not measured"


def report(embed_rows: list[Row], score_rows: list[Row], agreement: dict, header: str) -> str:
    lines = [f"# bench/gpu.py: {header}", ""]
    for title, rows, ceiling_word in (("embed", embed_rows, "ceiling"), ("score", score_rows, "torch.compile")):
        if not rows:
            continue
        ceilings = [r for r in rows if r.what.startswith("ceiling")]
        base = next((r for r in ceilings if ceiling_word in r.what), ceilings[-1])
        ratio_to(rows, base)
        lines += [f"## {title} (ratios against: {base.what})", "",
                  markdown_table(["what", "rate", "unit", "x ceiling", "note"],
                                 [(r.what, f"{r.rate:,.0f}" if r.rate == r.rate else "not measured", r.unit,
                                  r.vs, r.note) for r in rows]), ""]
    lines += ["## agreement", "", markdown_table(["measure", "value"], [(k, f"{v:.3g}" if isinstance(v, float)
                                                                            else v) for k, v in agreement.items()])]
    checks = []
    if "embed_min_cosine_vs_fp32" in agreement:
        ok = agreement["embed_min_cosine_vs_fp32"] >= EMBED_MIN_COSINE
        checks.append(f"embed min cosine to float32 >= {EMBED_MIN_COSINE}: {'yes' if ok else 'NO'}")
    if "score_float32_uncertainty_max_abs_delta" in agreement:
        worst = max(agreement["score_float32_uncertainty_max_abs_delta"], agreement["score_float32_nll_max_abs_delta"])
        ok = worst <= SCORE_TOL_NATS
        checks.append(f"score float32 max |delta| <= {SCORE_TOL_NATS} nats: {'yes' if ok else 'NO'}")
    return "\n".join(lines + [""] + checks) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--export-configs", type=Path, metavar="DIR",
                   help="write encoder/, llm/ (configs + tokenizers of the bundled models) and docs.jsonl, then exit")
    p.add_argument("--encoder-dir", type=Path, help="sentence-transformers folder (default: the bundled encoder)")
    p.add_argument("--llm-dir", type=Path, help="causal LM folder (default: the bundled scoring model)")
    p.add_argument("--random-weights", action="store_true", help="build the architectures from config.json")
    p.add_argument("--layers", type=int, help="with --random-weights: override the number of layers")
    p.add_argument("--data", type=Path, help=f"docs.jsonl or a folder of Parquet files (default {SHARED_DATA})")
    p.add_argument("--embed-docs", type=int, default=5000)
    p.add_argument("--score-docs", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokenize-workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)))
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile ceiling")
    p.add_argument("--only", choices=("embed", "score"), help="run one stage")
    p.add_argument("--smoke", action="store_true",
                   help="a few documents, one round, no compile, 2-layer random models: checks the script")
    p.add_argument("--out", type=Path, default=OUT / "gpu.md")
    args = p.parse_args(argv)
    if args.smoke:
        args.embed_docs, args.score_docs, args.max_tokens, args.rounds = 24, 8, 64, 1
        args.tokenize_workers, args.no_compile, args.layers = 1, True, args.layers or 2
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.export_configs:
        export_inputs(args.export_configs, max(args.embed_docs, args.score_docs))
        return 0
    ensure_labelnext()
    from labelnext.ops.core.model_prep import BUNDLED_ENCODER, BUNDLED_LLM, resolve_device
    from labelnext.ops.core.quiet import quiet_third_party

    quiet_third_party()
    device = resolve_device(args.device)
    encoder = str(args.encoder_dir) if args.encoder_dir else BUNDLED_ENCODER
    llm = str(args.llm_dir) if args.llm_dir else BUNDLED_LLM
    with tempfile.TemporaryDirectory(prefix="labelnext-gpu-bench-") as work:
        if args.random_weights:
            if not (args.encoder_dir and args.llm_dir):
                raise SystemExit("error: --random-weights needs --encoder-dir and --llm-dir (see --export-configs)")
            encoder = str(with_random_weights(args.encoder_dir, Path(work), causal=False, layers=args.layers))
            llm = str(with_random_weights(args.llm_dir, Path(work), causal=True, layers=args.layers))
        texts, source = load_texts(args.data, max(args.embed_docs, args.score_docs))
        import torch

        weights = "trained" if not args.random_weights else f"random, {args.layers} layers" if args.layers else "random"
        where = gpu_description() if device == "cuda" else "CPU"
        header = f"{where}, torch {torch.__version__}, {weights} weights, {source}"
        log(header)
        embed_rows, score_rows, agreement = [], [], {}
        if args.only in (None, "embed"):
            log("embed")
            embed_rows, agree = bench_embed(texts[:args.embed_docs], encoder, device, args.rounds,
                                            args.tokenize_workers)
            agreement.update(agree)
        if args.only in (None, "score"):
            log("score")
            score_rows, agree = bench_score(texts[:args.score_docs], llm, device, args.rounds, args.max_tokens,
                                            compile_ceiling=not args.no_compile, workers=args.tokenize_workers)
            agreement.update(agree)
    text = report(embed_rows, score_rows, agreement, header)
    publish(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
