"""``embed`` settings, apart from the encoder so the tokenize stage and the cache need not import it."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, PositiveInt

from labelnext.ops.core.model_prep import BUNDLED_ENCODER
from labelnext.ops.core.settings import StageSettings


class EmbedConfig(StageSettings):
    """``embed``: the sentence encoder and its batching (placement lives in ``resources.embed``)."""

    model: str = BUNDLED_ENCODER
    # Documents per encoder batch on CPU; GPU batches are bounded by batch_tokens alone.
    batch_size: int = Field(default=64, gt=0)
    # Padded tokens per encoder batch; auto = CPU_BATCH_TOKENS on CPU, GPU_BATCH_TOKENS on GPU.
    batch_tokens: Union[Literal["auto"], PositiveInt] = "auto"
    max_seq_length: int = Field(default=256, gt=0)
    # Encoder body precision; auto = float16 on GPU (min cosine to float32 measured by bench/gpu.py), float32
    # on CPU. Pooling and normalisation are float32 on every setting.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    cache: bool = True
