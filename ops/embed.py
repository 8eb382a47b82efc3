"""Embed stage: a sentence encoder over a batch of texts, normalised float32 vectors."""

from __future__ import annotations

import logging

import numpy as np

from pydantic import Field

from labelnext.ops.model_prep import BUNDLED_ENCODER, resolve_device, resolve_encoder_path
from labelnext.ops.columns import DOC_ID, EMBEDDING, TEXT
from labelnext.ops.contract import StageContract
from labelnext.ops.settings import StageSettings

log = logging.getLogger(__name__)


class EmbedConfig(StageSettings):
    """``embed``: the sentence encoder and its batching (placement lives in ``resources.embed``)."""

    model: str = BUNDLED_ENCODER
    batch_size: int = Field(default=64, gt=0)
    max_seq_length: int = Field(default=256, gt=0)
    cache: bool = True

CONTRACT = StageContract("embed", needs=(DOC_ID, TEXT), adds=(EMBEDDING,))
# Padded tokens per encoder batch on CPU (about 8 x 256-token documents).
CPU_BATCH_TOKENS = 2048


class Embedder:
    """Holds the encoder; ``__call__`` adds an ``embedding`` column (L2-normalised float32)."""

    def __init__(self, cfg: EmbedConfig, device: str = "auto"):
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg
        self.device = resolve_device(device)
        self.model = SentenceTransformer(resolve_encoder_path(cfg.model), device=self.device)
        self.model.max_seq_length = min(cfg.max_seq_length, self.model.max_seq_length or cfg.max_seq_length)
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim_of()

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.device != "cpu":
            return self._encode(texts, self.cfg.batch_size)
        # CPU: batches bounded by padded tokens as well as by documents. Long documents go in small batches
        # (their activations stay in cache), short ones in full batches; bench/throughput.py measures it.
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for idx in self._token_batches(texts):
            out[idx] = self._encode([texts[i] for i in idx], len(idx))
        return out

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        vectors = self.model.encode(
            texts,
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _token_batches(self, texts: list[str]) -> list[np.ndarray]:
        """Row groups, longest documents first, each within ``batch_size`` docs and CPU_BATCH_TOKENS padded tokens."""
        ids = self.model.tokenizer(texts, add_special_tokens=True, truncation=True,
                                   max_length=self.model.max_seq_length)["input_ids"]
        lengths = np.array([len(i) for i in ids], dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")
        batches, start = [], 0
        while start < len(order):
            # Sorted longest first, so the first row of a batch sets its padded length.
            fit = max(1, CPU_BATCH_TOKENS // max(1, int(lengths[order[start]])))
            end = min(len(order), start + min(fit, self.cfg.batch_size))
            batches.append(order[start:end])
            start = end
        return batches

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        batch[EMBEDDING] = self.encode(texts)
        return batch
