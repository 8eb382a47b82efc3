"""Embed stage: a sentence encoder over a batch of texts, normalised float32 vectors."""

from __future__ import annotations

import logging

import numpy as np

from ops.model_prep import resolve_device, resolve_encoder_path
from pipelines.config import EmbedConfig

log = logging.getLogger(__name__)

EMBEDDING = "embedding"


class Embedder:
    """Holds the encoder; ``__call__`` adds an ``embedding`` column (L2-normalised float32)."""

    def __init__(self, cfg: EmbedConfig):
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = SentenceTransformer(resolve_encoder_path(cfg.model), device=self.device)
        self.model.max_seq_length = min(cfg.max_seq_length, self.model.max_seq_length or cfg.max_seq_length)
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim_of()

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=self.cfg.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        batch[EMBEDDING] = self.encode(texts)
        return batch
