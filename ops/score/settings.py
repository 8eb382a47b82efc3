"""``score`` settings, apart from the Scorer so loading a config does not import torch."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, PositiveInt

from labelnext.ops.core.model_prep import BUNDLED_LLM
from labelnext.ops.core.settings import StageSettings
from labelnext.ops.score.prompt import TaskPrompt

# Tokens per forward pass when score.batch_tokens is "auto". CPU: activations of one batch stay in cache.
# GPU: bench/gpu.py and the H100 figures in the README (the Scorer at 8,192 ran at 0.44x its 65,536 rate).
CPU_BATCH_TOKENS = 8192
GPU_BATCH_TOKENS = 65536


class ScoreConfig(StageSettings):
    """``score``: the scoring LLM, what it is told, its backend and batching (placement: ``resources.score``)."""

    backend: Literal["auto", "vllm", "transformers"] = Field(
        default="auto", description="scoring engine; auto = vllm when importable, else transformers, and transformers for a task prompt with choices (it runs each prompt once and the choices after it)")
    model: str = Field(default=BUNDLED_LLM, description="a bundled:NAME, a local checkpoint folder or a GGUF file, "
                       "or a hub id already in the local hub cache (no downloads at run time)")
    task: TaskPrompt = Field(default_factory=TaskPrompt, description="the task the model is told (score.task.*)")
    max_tokens: int = Field(default=512, gt=1, description="model input positions per document, the prompt "
                            "included; longer documents are truncated (counted in the report)")
    truncation: Literal["head", "head_tail"] = Field(
        default="head", description="what a truncated document keeps: its head, or half head and half tail")
    batch_tokens: Union[Literal["auto"], PositiveInt] = Field(
        default="auto", description="tokens per forward pass (vLLM: max_num_batched_tokens); auto = "
        f"{CPU_BATCH_TOKENS} on CPU, {GPU_BATCH_TOKENS} on GPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="model body precision; auto = bfloat16 on GPU, float32 on CPU (the output head "
        "and the entropy are float32 on every setting)")
    packing: Literal["auto", "on", "off"] = Field(
        default="auto", description="transformers backend: several documents per row, kept apart by restarting "
        "position ids (checked when the model loads), else length buckets; auto = packed on GPU, buckets on CPU")
    compile: Literal["auto", "on", "off"] = Field(
        default="auto", description="transformers backend, packed rows only: torch.compile the model body; auto = "
        "on for GPU (a packed bf16 forward measured 576k vs 410k tokens/s eager on one H200), off on CPU")
    fused_head: Literal["auto", "on", "off"] = Field(
        default="auto", description="output head and exact entropy computed together, the vocabulary in chunks "
        "(no logit matrix in memory; same scores within float32 rounding); auto = on for GPU, off on CPU (the "
        "head and entropy measured level with the unfused path on a 2-core CPU)")
    cache_dir: Optional[str] = Field(default=None, description="where converted bundled/GGUF checkpoints are "
                                     "kept (default: ~/.cache/labelnext/models)")
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1,
                                          description="vLLM: share of GPU memory the engine may take")

    @property
    def prompted(self) -> bool:
        return self.task.prompted


def batch_tokens_for(cfg: ScoreConfig, device: str) -> int:
    if cfg.batch_tokens != "auto":
        return int(cfg.batch_tokens)
    return CPU_BATCH_TOKENS if device == "cpu" else GPU_BATCH_TOKENS


def on_for(setting: str, device: str) -> bool:
    """An auto/on/off setting whose auto means on for GPU, off on CPU."""
    return setting == "on" or (setting == "auto" and device != "cpu")
