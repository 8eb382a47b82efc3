"""``score`` settings, apart from ``score.py`` so loading a config does not import torch."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, PositiveInt

from labelnext.ops.core.model_prep import BUNDLED_LLM
from labelnext.ops.core.settings import StageSettings

# Tokens per forward pass when score.batch_tokens is "auto". CPU: activations of one batch stay in cache.
# GPU: bench/gpu.py and the H100 figures in the README (the Scorer at 8,192 ran at 0.44x its 65,536 rate).
CPU_BATCH_TOKENS = 8192
GPU_BATCH_TOKENS = 65536


class ScoreConfig(StageSettings):
    """``score``: the scoring LLM, its backend and batching (placement lives in ``resources.score``)."""

    backend: Literal["auto", "vllm", "transformers"] = "auto"
    model: str = BUNDLED_LLM
    max_tokens: int = Field(default=512, gt=1)
    truncation: Literal["head", "head_tail"] = "head"
    # Tokens per forward pass (vLLM: max_num_batched_tokens); auto = CPU_BATCH_TOKENS or GPU_BATCH_TOKENS.
    batch_tokens: Union[Literal["auto"], PositiveInt] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # transformers backend: several documents per row of the batch, kept apart by position ids (no padding
    # but a row's tail) when the model honours them (checked when the model loads), else length buckets.
    # auto = packed on GPU, buckets on CPU (the CPU figures in the README were measured with buckets).
    packing: Literal["auto", "on", "off"] = "auto"
    # transformers backend, packed rows only: torch.compile the model body. auto = on for GPU (a packed bf16
    # forward measured 576k vs 410k tokens/s eager on one H200), off on CPU (compile time is not paid back).
    compile: Literal["auto", "on", "off"] = "auto"
    cache_dir: Optional[str] = None
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)


def batch_tokens_for(cfg: ScoreConfig, device: str) -> int:
    if cfg.batch_tokens != "auto":
        return int(cfg.batch_tokens)
    return CPU_BATCH_TOKENS if device == "cpu" else GPU_BATCH_TOKENS


def on_for(setting: str, device: str) -> bool:
    """An auto/on/off setting whose auto means on for GPU, off on CPU."""
    return setting == "on" or (setting == "auto" and device != "cpu")
