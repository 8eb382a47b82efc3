"""vLLM scoring backend: the causal LM run as a pooling model that returns every position's hidden state.

vLLM's ``prompt_logprobs`` returns the top-k log-probabilities per position, not enough for the exact
entropy over the vocabulary; with ``k = -1`` it is exact but builds V Python objects per position (measured
~250x slower than ``k = 1`` for SmolLM2's 49k vocabulary on CPU). Instead the model runs with
``runner="pooling"``, ``convert="embed"`` and token-wise ``ALL`` pooling without activation
(``pooling_task="token_embed"``): vLLM returns the final post-norm hidden state of every prompt position, and
the Scorer applies the float32 LM head from the checkpoint to get exact full-vocabulary logits. Prefix
caching is off because a cached prefix would not be recomputed and its hidden states would be missing.

The engine works on the next group of sequences while the Scorer applies the head to the current one
(``hidden_states`` prefetches one group in a thread): the engine process and the head then overlap instead of
taking turns, which bench/score.py measures.

``LLM(...)`` spawns engine processes: build this backend inside a Ray actor or under
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import torch

from labelnext.ops.score.head import OutputHead
from labelnext.ops.score.inputs import split_by_tokens

log = logging.getLogger(__name__)

# CPU vLLM reserves its KV cache up front; scoring needs one prefill window per sequence, not a chat server's.
_CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# vLLM logs to stdout by default; a batch job's stdout belongs to its own output.
_ENV_DEFAULTS = {"VLLM_LOGGING_LEVEL": "WARNING", "VLLM_LOGGING_STREAM": "ext://sys.stderr"}

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def apply_env_defaults(device: str) -> None:
    """Set before the engine starts (vLLM reads them then), never overriding what the user set."""
    for key, value in {**_ENV_DEFAULTS, **(_CPU_ENV_DEFAULTS if device == "cpu" else {})}.items():
        os.environ.setdefault(key, value)


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_dir: str, *, device: str, dtype: torch.dtype, window: int, batch_tokens: int,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85, seed: int = 0):
        apply_env_defaults(device)
        from vllm import LLM
        from vllm.config import PoolerConfig
        from vllm.pooling_params import PoolingParams

        kwargs = dict(
            model=model_dir,
            runner="pooling",
            convert="embed",
            pooler_config=PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False),
            dtype=_DTYPE_NAMES[dtype],
            max_model_len=window,
            max_num_batched_tokens=max(batch_tokens, window),
            enable_prefix_caching=False,
            seed=seed,
        )
        if device == "cpu":
            # torch.compile warm-up costs more than it saves for a short scoring pass on CPU.
            kwargs["enforce_eager"] = True
        else:
            kwargs.update(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization)
        self.llm = LLM(**kwargs)
        # A quarter of the engine's token budget per request group: small enough to overlap with the head,
        # large enough to keep the engine's steps full.
        self.group_tokens = max(window, batch_tokens // 4)
        self.params = PoolingParams(use_activation=False)
        self.device = torch.device(device)
        self.head = OutputHead.from_checkpoint(model_dir, device=self.device)

    def hidden_states(self, seqs: Sequence[Sequence[int]]) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(index, hidden[L, H])`` for every sequence, group by group; while the caller works on one
        group's hidden states the engine computes the next group's."""
        if not seqs:
            return
        groups = split_by_tokens([len(s) for s in seqs], self.group_tokens)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-encode") as pool:
            pending = pool.submit(self._encode, seqs, groups[0])
            for k, group in enumerate(groups):
                outputs = pending.result()
                if k + 1 < len(groups):
                    pending = pool.submit(self._encode, seqs, groups[k + 1])
                yield from zip(group, outputs)

    def _encode(self, seqs: Sequence[Sequence[int]], group: list[int]) -> list[torch.Tensor]:
        outputs = self.llm.encode(
            [{"prompt_token_ids": list(seqs[i])} for i in group],
            pooling_params=self.params,
            pooling_task="token_embed",
            use_tqdm=False,
        )
        hidden = []
        for i, out in zip(group, outputs):
            data = out.outputs.data
            if data.shape[0] != len(seqs[i]):
                raise RuntimeError(f"vLLM returned {data.shape[0]} hidden states for a {len(seqs[i])}-token prompt")
            hidden.append(data.to(self.device))
        return hidden

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
