"""Score stage: a small causal LLM reads each candidate once (prefill only) and reports its uncertainty.

Per document: ``uncertainty`` = mean over predicted positions of the exact Shannon entropy (nats) of the
next-token distribution over the full vocabulary, ``max_entropy``, ``nll`` (mean next-token NLL),
``n_tokens`` (predicted positions = model input tokens - 1) and ``truncated``.

:class:`Scorer` is plain Python (testable without Ray); :func:`score_dataset` wraps it in a Ray Data actor
pool. Backends (``labelnext.ops.score_hf``, ``labelnext.ops.score_vllm``) only produce final hidden states; the float32 output
head and the entropy maths (``labelnext.ops.entropy``) are shared, so both backends score identically.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Optional, TYPE_CHECKING, Sequence

import numpy as np

from labelnext.ops.entropy import EMPTY, hidden_entropy_nll, reduce_doc
from labelnext.ops.model_prep import prepare_model, resolve_device
from labelnext.ops.score_inputs import bos_prefix, encode, text_token_ids
from labelnext.ops.columns import DOC_ID, SCORE_COLUMNS, TEXT
from labelnext.ops.contract import StageContract
from labelnext.ops.score_settings import ScoreConfig

if TYPE_CHECKING:
    import ray.data
    import torch

log = logging.getLogger(__name__)

CONTRACT = StageContract("score", needs=(DOC_ID, TEXT), adds=SCORE_COLUMNS)
BACKENDS = ("vllm", "transformers")
# Bytes of float32 logits one output-head chunk may hold (one large matmul; the entropy statistics then run
# over it in cache-sized row blocks, see ops.entropy).
_LOGIT_CHUNK_BYTES = 1 << 27


def resolve_dtype(dtype: str, device: str) -> "torch.dtype":
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def choose_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    from labelnext.ops.score_vllm import vllm_available

    return "vllm" if vllm_available() else "transformers"


@lru_cache(maxsize=4)
def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def model_window(model_dir: str, max_tokens: int) -> int:
    """Model input positions per document: ``max_tokens`` capped by the model's position limit."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    return min(max_tokens, int(limit)) if limit else max_tokens


def count_tokens(texts: list[str], cfg: ScoreConfig) -> list[int]:
    """Predicted positions each text would give before truncation (same unit as ``n_tokens``), tokenizer only."""
    tokenizer = load_tokenizer(prepare_model(cfg.model, cfg.cache_dir))
    prefix = len(bos_prefix(tokenizer))
    return [max(0, prefix + len(ids) - 1) for ids in text_token_ids(tokenizer, [str(t) for t in texts])]


class Scorer:
    """Holds the scoring model; ``__call__`` adds :data:`SCORE_COLUMNS` to a batch with ``doc_id`` and ``text``."""

    def __init__(self, cfg: ScoreConfig, device: str = "auto", *, num_cpus: float = 1.0,
                 tensor_parallel_size: int = 1):
        self.cfg = cfg
        self.num_cpus = num_cpus
        self.tensor_parallel_size = tensor_parallel_size
        self.model_dir = prepare_model(cfg.model, cfg.cache_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.window = model_window(self.model_dir, cfg.max_tokens)
        self.backend = choose_backend(cfg.backend)
        self.engine = self._build_engine()
        self.chunk = max(16, _LOGIT_CHUNK_BYTES // (4 * self.engine.head.vocab_size))
        log.info("scorer: %s backend on %s (%s), window %d tokens", self.backend, self.device,
                 str(self.dtype).removeprefix("torch."), self.window)

    def _build_engine(self):
        if self.backend == "transformers":
            from labelnext.ops.score_hf import HFBackend

            if self.device == "cpu":
                import torch

                # Use the CPUs the stage reserves (resources.score.num_cpus), as a Ray actor would via
                # OMP_NUM_THREADS; more threads than reserved cores only contend with the pipeline's other workers.
                torch.set_num_threads(min(torch.get_num_threads(), max(1, int(self.num_cpus))))
            return HFBackend(self.model_dir, device=self.device, dtype=self.dtype, batch_tokens=self.cfg.batch_tokens)
        if self.backend == "vllm":
            from labelnext.ops.score_vllm import VLLMBackend

            return VLLMBackend(
                self.model_dir, device=self.device, dtype=self.dtype, window=self.window,
                batch_tokens=self.cfg.batch_tokens, tensor_parallel_size=self.tensor_parallel_size,
                gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            )
        raise ValueError(f"unknown score.backend {self.backend!r}; expected one of {BACKENDS}")

    def score_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        import torch

        enc = encode(self.tokenizer, texts, window=self.window, truncation=self.cfg.truncation)
        stats = [EMPTY] * len(texts)
        todo = [i for i, ids in enumerate(enc.ids) if len(ids) >= 2]
        seqs = [enc.ids[i] for i in todo]
        # Positions of several short documents go through the output head together (one large matmul per
        # chunk instead of many small ones); pending hidden states stay bounded by a few chunks.
        pending: list[tuple[int, torch.Tensor]] = []
        pending_positions = 0

        def flush() -> None:
            nonlocal pending_positions
            if not pending:
                return
            device = self.engine.head.device
            hidden = torch.cat([h.to(device) for _, h in pending])
            targets = torch.cat([torch.as_tensor(seqs[j][1:]) for j, _ in pending]).to(device)
            entropy, nll = hidden_entropy_nll(hidden, targets, head=self.engine.head, chunk=self.chunk)
            sizes = [h.shape[0] for _, h in pending]
            for (j, _), e, n in zip(pending, entropy.split(sizes), nll.split(sizes)):
                stats[todo[j]] = reduce_doc(e, n)
            pending.clear()
            pending_positions = 0

        with torch.inference_mode():
            for j, hidden in self.engine.hidden_states(seqs):
                pending.append((j, hidden[:-1]))  # position t predicts token t + 1; the last has no target
                pending_positions += hidden.shape[0] - 1
                if pending_positions >= 4 * self.chunk:
                    flush()
            flush()
        return {
            "uncertainty": np.array([s.mean_entropy for s in stats], dtype=np.float32),
            "max_entropy": np.array([s.max_entropy for s in stats], dtype=np.float32),
            "nll": np.array([s.nll for s in stats], dtype=np.float32),
            "n_tokens": np.array([s.n_tokens for s in stats], dtype=np.int64),
            "truncated": np.array(enc.truncated, dtype=bool),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = ["" if t is None or (isinstance(t, float) and math.isnan(t)) else str(t) for t in batch["text"]]
        out = dict(batch)
        out.update(self.score_texts(texts))
        return out

    def close(self) -> None:
        self.engine.close()


class _ScoreActor(Scorer):
    """Ray Data actor: quiet third-party logs in the worker, then load the model once."""

    def __init__(self, cfg: ScoreConfig, device: str, num_cpus: float, tensor_parallel_size: int):
        from labelnext.ops.quiet import quiet_third_party

        quiet_third_party()
        super().__init__(cfg, device, num_cpus=num_cpus, tensor_parallel_size=tensor_parallel_size)


def docs_per_batch(cfg: ScoreConfig) -> int:
    # A few token budgets' worth of documents per Ray batch: enough to sort by length and keep the engine
    # busy, small enough that a few hundred candidates still spread over the actor pool.
    return max(32, 4 * cfg.batch_tokens // cfg.max_tokens)


def score_dataset(
    ds: "ray.data.Dataset",
    cfg: ScoreConfig,
    *,
    use_gpu: bool,
    concurrency: int,
    num_gpus: float = 0.0,
    num_cpus: float = 1.0,
    tensor_parallel_size: int = 1,
) -> "ray.data.Dataset":
    """Score every row of ``ds`` (columns ``doc_id``, ``text``, ...) with an actor pool of :class:`Scorer`.

    ``num_gpus`` (per actor, tensor parallelism included) and ``num_cpus`` come from the job layer's placement
    plan. Output batches also carry ``_node_id``/``_busy_s``.
    """
    from ray.data import ActorPoolStrategy

    from labelnext.ops.instrument import instrumented

    device = "cuda" if use_gpu else "cpu"
    return ds.map_batches(
        instrumented(_ScoreActor),
        fn_constructor_kwargs={"cfg": cfg, "device": device, "num_cpus": num_cpus,
                               "tensor_parallel_size": tensor_parallel_size},
        batch_size=docs_per_batch(cfg),
        compute=ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus if use_gpu else 0,
        num_cpus=num_cpus,
        batch_format="numpy",
    )
