"""Score stage: a small causal LLM reads each candidate once (prefill only) and reports its uncertainty.

Per document: ``uncertainty`` = mean over predicted positions of the exact Shannon entropy (nats) of the
next-token distribution over the full vocabulary, ``max_entropy``, ``nll`` (mean next-token NLL),
``n_tokens`` (predicted positions = model input tokens - 1) and ``truncated``.

With a task prompt (``score.task``, see ``labelnext.ops.score.prompt``) the model reads the prompt instead and
``uncertainty`` is the entropy of its calibrated distribution over the choices, with ``llm_label``,
``llm_margin`` and ``llm_probs`` added (``labelnext.ops.score.choices``), or, without choices, the entropy of
the first answer token; ``nll`` and ``max_entropy`` are then NaN and ``n_tokens`` counts prompt and choice tokens.

:class:`Scorer` is plain Python (testable without Ray); :func:`score_dataset` wraps it in a Ray Data actor
pool. Backends (``labelnext.ops.score.backend_hf``, ``labelnext.ops.score.backend_vllm``) only produce final hidden states; the float32 output
head and the entropy maths (``labelnext.ops.score.entropy``) are shared, so both backends score identically.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from pathlib import Path
from typing import Optional, TYPE_CHECKING, Sequence

import numpy as np

from labelnext.ops.score import choices as ch
from labelnext.ops.score.entropy import hidden_entropy_nll, segment_stats
from labelnext.ops.score.fused_head import fused_entropy_nll
from labelnext.ops.core.model_prep import prepare_model, resolve_device
from labelnext.ops.score.inputs import bos_prefix, encode, text_token_ids
from labelnext.ops.score.prompt import PromptFormat
from labelnext.ops.core.columns import DOC_ID, LLM_COLUMNS, SCORE_COLUMNS, SCORE_IDS, SCORE_TRUNCATED, TEXT
from labelnext.ops.core.contract import StageContract
from labelnext.ops.score.settings import ScoreConfig, batch_tokens_for, on_for

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data
    import torch

log = logging.getLogger(__name__)

CONTRACT = StageContract("score", needs=(DOC_ID, TEXT), adds=SCORE_COLUMNS)
BACKENDS = ("vllm", "transformers")
# Bytes of float32 logits one output-head chunk may hold (one large matmul; on CPU the entropy statistics then
# run over it in cache-sized row blocks, see ops.entropy). A GPU takes larger chunks: fewer kernel launches.
_CPU_LOGIT_CHUNK_BYTES = 1 << 27
_GPU_LOGIT_CHUNK_BYTES = 1 << 30
# Positions of per-document hidden states (backends without whole-batch output) gathered before the head runs.
_GROUP_CHUNKS = 4


def score_columns(cfg: ScoreConfig) -> tuple[str, ...]:
    """The columns the Scorer adds under ``cfg``."""
    return SCORE_COLUMNS + (LLM_COLUMNS if cfg.task.prompted and cfg.task.choices else ())


def contract_for(cfg: ScoreConfig) -> StageContract:
    return StageContract("score", needs=(DOC_ID, TEXT), adds=score_columns(cfg))


def resolve_dtype(dtype: str, device: str) -> "torch.dtype":
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def choose_backend(backend: str, choices: bool = False) -> str:
    """``score.backend`` resolved: auto = transformers for a task prompt with choices (each prompt runs once and
    its choices after it; vLLM's token-wise pooling runs every prompt + choice sequence whole), else vllm when
    importable."""
    if backend != "auto":
        return backend
    if choices:
        return "transformers"
    from labelnext.ops.score.backend_vllm import vllm_available

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


def count_tokens(texts: list[str], cfg: ScoreConfig, window: bool = False) -> list[int]:
    """Tokens each text costs the scoring model (the unit of ``n_tokens``), tokenizer only: predicted positions
    as plain text, prompt + choice tokens with a task prompt; before truncation, or within the window
    (``score.max_tokens``) with ``window``.

    The run's cost estimate calls this on the driver, which never loads a model: the checkpoint's
    ``tokenizer.json`` is read with the tokenizers library when it has one (the ids of its transformers fast
    tokenizer, without importing transformers: seconds per run), else through transformers.
    """
    model_dir = prepare_model(cfg.model, cfg.cache_dir)
    texts = [str(t) for t in texts]
    if cfg.prompted:  # the rendered prompt needs the chat template: transformers' tokenizer
        tokenizer = load_tokenizer(model_dir)
        prompt = PromptFormat.build(tokenizer, cfg.task)
        cap = prompt.max_prompt(model_window(model_dir, cfg.max_tokens)) if window else None
        return [min(len(i) + prompt.overhead, cap or 1 << 62) + prompt.choice_tokens
                for i in text_token_ids(tokenizer, texts)]
    fast = fast_token_counter(model_dir)
    if fast is not None:
        prefix, tokenizer = fast
        ids = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []
    else:
        tokenizer = load_tokenizer(model_dir)
        prefix, ids = len(bos_prefix(tokenizer)), text_token_ids(tokenizer, texts)
    counts = [max(0, prefix + len(i) - 1) for i in ids]
    # A window of max_tokens positions predicts max_tokens - 1 of them.
    return [min(c, cfg.max_tokens - 1) for c in counts] if window else counts


@lru_cache(maxsize=4)
def fast_token_counter(model_dir: str):
    """(BOS positions, ``tokenizers.Tokenizer``) from the checkpoint's own files, or None when they do not say
    enough (no ``tokenizer.json``, or a BOS token it does not know)."""
    import json

    folder = Path(model_dir)
    if not (folder / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # transformers' own order
        if (folder / name).is_file():
            bos = bos or json.loads((folder / name).read_text()).get("bos_token")
    if isinstance(bos, dict):
        bos = bos.get("content")
    if bos is None:
        return 0, tokenizer
    return (1, tokenizer) if tokenizer.token_to_id(str(bos)) is not None else None


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
        self.tokenize = ScoreTokenizer(self.model_dir, cfg)
        self.tokenizer, self.window = self.tokenize.tokenizer, self.tokenize.window
        self.batch_tokens = batch_tokens_for(cfg, self.device)
        self.backend = choose_backend(cfg.backend, choices=bool(cfg.task.prompted and cfg.task.choices))
        self.engine = self._build_engine()
        chunk_bytes = _CPU_LOGIT_CHUNK_BYTES if self.device == "cpu" else _GPU_LOGIT_CHUNK_BYTES
        self.chunk = max(16, chunk_bytes // (4 * self.engine.head.vocab_size))
        self._calibration: Optional[np.ndarray] = None
        log.info("scorer: %s backend on %s (%s), window %d tokens, %d tokens per batch%s", self.backend,
                 self.device, str(self.dtype).removeprefix("torch."), self.window, self.batch_tokens,
                 ", packed rows" if getattr(self.engine, "packed", False) else "")

    def _build_engine(self):
        if self.backend == "transformers":
            from labelnext.ops.score.backend_hf import HFBackend

            if self.device == "cpu":
                import torch

                # Use the CPUs the stage reserves (resources.score.num_cpus), as a Ray actor would via
                # OMP_NUM_THREADS; more threads than reserved cores only contend with the pipeline's other workers.
                torch.set_num_threads(min(torch.get_num_threads(), max(1, int(self.num_cpus))))
            return HFBackend(self.model_dir, device=self.device, dtype=self.dtype, batch_tokens=self.batch_tokens,
                             window=self.window, packing=on_for(self.cfg.packing, self.device),
                             compile=on_for(self.cfg.compile, self.device))
        if self.backend == "vllm":
            from labelnext.ops.score.backend_vllm import VLLMBackend

            return VLLMBackend(
                self.model_dir, device=self.device, dtype=self.dtype, window=self.window,
                batch_tokens=self.batch_tokens, tensor_parallel_size=self.tensor_parallel_size,
                gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            )
        raise ValueError(f"unknown score.backend {self.backend!r}; expected one of {BACKENDS}")

    def score_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = self.tokenize(texts)
        return self.score_ids(enc.ids, enc.truncated)

    def score_ids(self, ids: Sequence[Sequence[int]], truncated: Sequence[bool]) -> dict[str, np.ndarray]:
        """:meth:`score_texts` for documents already encoded (:class:`ScoreTokenizer` with this window)."""
        if self.tokenize.prompt is not None:
            return self._score_prompts(ids, truncated)
        return self._score_plain(ids, truncated)

    def _score_prompts(self, ids: Sequence[Sequence[int]], truncated: Sequence[bool]) -> dict[str, np.ndarray]:
        import torch

        prompt = self.tokenize.prompt
        n = len(ids)
        out = {"max_entropy": np.full(n, np.nan, np.float32), "nll": np.full(n, np.nan, np.float32),
               "n_tokens": np.array([len(s) + prompt.choice_tokens for s in ids], dtype=np.int64),
               "truncated": np.array(truncated, dtype=bool)}
        with torch.inference_mode():
            if not prompt.choices:
                entropy = ch.answer_entropy_from_hidden(self._hidden_batches(list(ids)), ids, self.engine.head,
                                                        self.chunk)
                return {"uncertainty": entropy.astype(np.float32), **out}
            probs = ch.normalise(self.choice_logprobs(ids), self.calibration())
        return {**ch.choice_stats(probs, self.cfg.task.choices), **out}

    def choice_logprobs(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """``[documents, choices]``: log-probability of each choice's whole token sequence after each prompt."""
        choices = self.tokenize.prompt.choices
        if hasattr(self.engine, "choice_hidden") and not getattr(self.engine, "packed", False):
            shared = len(self.tokenize.prompt.head)
            return ch.choice_logprobs_reusing_prompt(
                lambda prompts, names: self.engine.choice_hidden(prompts, names, shared), ids, choices,
                self.engine.head, self.chunk)
        # Whole prompt + choice sequences through the engine's batched path (packed rows, vLLM).
        seqs, starts = ch.choice_targets(ids, choices)
        flat = ch.choice_logprobs_from_hidden(self._hidden_batches(seqs), seqs, starts, choices, self.engine.head,
                                              self.chunk)
        return flat.reshape(len(ids), len(choices))

    def calibration(self) -> Optional[np.ndarray]:
        """The choice distribution the prompt gives the content-free document (once per Scorer), or None."""
        if not self.cfg.task.calibrate:
            return None
        if self._calibration is None:
            enc = self.tokenize([self.cfg.task.content_free])
            self._calibration = ch.normalise(self.choice_logprobs(enc.ids))[0]
        return self._calibration

    def _score_plain(self, ids: Sequence[Sequence[int]], truncated: Sequence[bool]) -> dict[str, np.ndarray]:
        import torch

        stats = np.full((len(ids), 3), np.nan)
        n_tokens = np.zeros(len(ids), dtype=np.int64)
        todo = [i for i, seq in enumerate(ids) if len(seq) >= 2]
        seqs = [ids[i] for i in todo]
        with torch.inference_mode():
            for group, hidden in self._hidden_batches(seqs):
                rows = [todo[j] for j in group]
                stats[rows] = self._batch_stats([seqs[j] for j in group], hidden)
                n_tokens[rows] = [len(seqs[j]) - 1 for j in group]
        return {
            "uncertainty": stats[:, 0].astype(np.float32),
            "max_entropy": stats[:, 1].astype(np.float32),
            "nll": stats[:, 2].astype(np.float32),
            "n_tokens": n_tokens,
            "truncated": np.array(truncated, dtype=bool),
        }

    def _hidden_batches(self, seqs: list[list[int]]):
        """``(indices, hidden)`` batches, documents back to back; per-document backends are grouped here so
        the head runs on large blocks of positions."""
        import torch

        if hasattr(self.engine, "hidden_batches"):
            yield from self.engine.hidden_batches(seqs)
            return
        group, parts, positions = [], [], 0
        for j, hidden in self.engine.hidden_states(seqs):
            group.append(j)
            parts.append(hidden)
            positions += hidden.shape[0]
            if positions >= _GROUP_CHUNKS * self.chunk:
                yield group, torch.cat(parts)
                group, parts, positions = [], [], 0
        if group:
            yield group, torch.cat(parts)

    def _batch_stats(self, seqs: list[list[int]], hidden: "torch.Tensor") -> np.ndarray:
        """``[mean entropy, max entropy, mean NLL]`` per document of a batch: position ``t`` predicts token
        ``t + 1`` of the same document (a document's last position has no target). Computed on the head's
        device with one copy to the host per batch."""
        import torch

        device = self.engine.head.device
        lengths = torch.tensor([len(s) for s in seqs])
        ids = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])).to(device)
        last = torch.cumsum(lengths, 0).to(device) - 1
        predicts = torch.ones(ids.shape[0], dtype=torch.bool, device=device)
        predicts[last] = False
        targets = ids.roll(-1)[predicts]
        if on_for(self.cfg.fused_head, self.device):
            entropy, nll = fused_entropy_nll(hidden.to(device)[predicts], targets, self.engine.head)
        else:
            entropy, nll = hidden_entropy_nll(hidden.to(device)[predicts], targets, head=self.engine.head,
                                              chunk=self.chunk)
        return segment_stats(entropy, nll, lengths - 1).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(batch)
        ids = out.pop(SCORE_IDS, None)
        truncated = out.pop(SCORE_TRUNCATED, None)
        if ids is not None:  # tokenised by score_tokenize_batch tasks on CPU workers
            # Plain int lists, as the tokenizer gives them: engines (vLLM's request encoding) expect Python ints.
            out.update(self.score_ids([np.asarray(i, dtype=np.int64).tolist() for i in ids], truncated))
        else:
            out.update(self.score_texts(_texts(batch[TEXT])))
        return out

    def close(self) -> None:
        self.engine.close()


def _texts(values) -> list[str]:
    return ["" if t is None or (isinstance(t, float) and math.isnan(t)) else str(t) for t in values]


class ScoreTokenizer:
    """Text -> the Scorer's input ids (BOS or the task prompt, window, truncation), with only the tokenizer loaded."""

    def __init__(self, model_dir: str, cfg: ScoreConfig):
        self.tokenizer = load_tokenizer(model_dir)
        self.window = model_window(model_dir, cfg.max_tokens)
        self.truncation = cfg.truncation
        self.prompt = PromptFormat.build(self.tokenizer, cfg.task) if cfg.prompted else None

    def __call__(self, texts: Sequence[str]):
        if self.prompt is not None:
            return self.prompt.encode(self.tokenizer, texts, window=self.window, truncation=self.truncation)
        return encode(self.tokenizer, texts, window=self.window, truncation=self.truncation)


@lru_cache(maxsize=2)
def score_tokenizer_for(settings: str) -> ScoreTokenizer:
    """The ScoreTokenizer of a ``ScoreConfig`` given as JSON, once per process."""
    # Ray reuses task worker processes: the tokenizer loads once per worker, not once per batch.
    cfg = ScoreConfig.model_validate_json(settings)
    return ScoreTokenizer(prepare_model(cfg.model, cfg.cache_dir), cfg)


def score_tokenize_batch(table: "pa.Table", cfg: ScoreConfig) -> "pa.Table":
    """Ray Data task: add the Scorer's input ids (``_score_ids``, ``_score_truncated``) to a batch with text."""
    import pyarrow as pa

    from labelnext.ops.embed.tokenize import ids_array

    enc = score_tokenizer_for(cfg.model_dump_json())(_texts(table.column(TEXT).to_pylist()))
    ids = ids_array([np.asarray(i, dtype=np.int32) for i in enc.ids])
    return table.append_column(SCORE_IDS, ids).append_column(SCORE_TRUNCATED, pa.array(enc.truncated, pa.bool_()))


class _ScoreActor(Scorer):
    """Ray Data actor: quiet third-party logs in the worker, then load the model once."""

    def __init__(self, cfg: ScoreConfig, device: str, num_cpus: float, tensor_parallel_size: int):
        from labelnext.ops.core.quiet import quiet_third_party

        quiet_third_party()
        super().__init__(cfg, device, num_cpus=num_cpus, tensor_parallel_size=tensor_parallel_size)


def docs_per_batch(cfg: ScoreConfig, device: str = "cpu") -> int:
    # A few token budgets' worth of documents per Ray batch even when every document fills the window: enough
    # to sort by length and keep the engine busy, small enough that a few hundred candidates still spread over
    # a CPU actor pool. A GPU takes 4x more: documents are mostly far shorter than the window, and a packed
    # call rounds its last batch up to a power-of-two number of rows.
    budgets = 4 if device == "cpu" else 16
    return max(32, budgets * batch_tokens_for(cfg, device) // cfg.max_tokens)


def score_dataset(
    ds: "ray.data.Dataset",
    cfg: ScoreConfig,
    *,
    use_gpu: bool,
    concurrency: int,
    num_gpus: float = 0.0,
    num_cpus: float = 1.0,
    tensor_parallel_size: int = 1,
    tokenize_in_tasks: Optional[bool] = None,
) -> "ray.data.Dataset":
    """Score every row of ``ds`` (columns ``doc_id``, ``text``, ...) with an actor pool of :class:`Scorer`.

    ``num_gpus`` (per actor, tensor parallelism included) and ``num_cpus`` come from the job layer's placement
    plan. Output batches also carry ``_node_id``/``_busy_s``. ``tokenize_in_tasks`` (default: on GPU) runs the
    tokenizer in CPU tasks ahead of the actors: on one H100 a Scorer call that tokenised its own text ran at
    0.44x the packed compiled ceiling, and 0.71x on ids (README, "GPU stages").
    """
    from ray.data import ActorPoolStrategy

    from labelnext.ops.core.instrument import instrumented

    device = "cuda" if use_gpu else "cpu"
    if use_gpu if tokenize_in_tasks is None else tokenize_in_tasks:
        ds = ds.map_batches(score_tokenize_batch, fn_kwargs={"cfg": cfg}, batch_size=docs_per_batch(cfg, device),
                            batch_format="pyarrow", num_cpus=1)
    return ds.map_batches(
        instrumented(_ScoreActor),
        fn_constructor_kwargs={"cfg": cfg, "device": device, "num_cpus": num_cpus,
                               "tensor_parallel_size": tensor_parallel_size},
        batch_size=docs_per_batch(cfg, device),
        compute=ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus if use_gpu else 0,
        num_cpus=num_cpus,
        batch_format="numpy",
    )
