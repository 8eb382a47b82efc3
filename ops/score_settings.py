"""``score`` settings, apart from ``score.py`` so loading a config does not import torch."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from labelnext.ops.model_prep import BUNDLED_LLM
from labelnext.ops.settings import StageSettings


class ScoreConfig(StageSettings):
    """``score``: the scoring LLM, its backend and batching (placement lives in ``resources.score``)."""

    backend: Literal["auto", "vllm", "transformers"] = "auto"
    model: str = BUNDLED_LLM
    max_tokens: int = Field(default=512, gt=1)
    truncation: Literal["head", "head_tail"] = "head"
    batch_tokens: int = Field(default=8192, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache_dir: Optional[str] = None
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
