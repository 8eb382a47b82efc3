"""Embed stage: a sentence encoder over token ids (or texts), L2-normalised float32 vectors.

In a run the tokenize stage (``labelnext.ops.embed.tokenize``) turns text into ids on CPU workers and the encoder
actors only run the model: documents sorted by length go in batches bounded by padded tokens (each batch
padded to its own longest document, not to the longest in the Ray batch), the encoder body runs in half
precision on GPU, and pooling and normalisation stay on the device, with one copy to the host per call.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from labelnext.ops.core.model_prep import resolve_device, resolve_encoder_path
from labelnext.ops.core.columns import DOC_ID, EMBEDDING, TEXT, TOKEN_IDS
from labelnext.ops.core.contract import StageContract
from labelnext.ops.embed.settings import EmbedConfig
from labelnext.ops.embed.tokenize import EncoderTokenizer

log = logging.getLogger(__name__)

__all__ = ["CONTRACT", "CPU_BATCH_TOKENS", "EmbedConfig", "Embedder", "GPU_BATCH_TOKENS", "ray_batch_docs",
           "resolve_device", "resolve_encoder_path", "token_budget_batches"]


CONTRACT = StageContract("embed", needs=(DOC_ID, TEXT), adds=(EMBEDDING,))
# Padded tokens per encoder batch on CPU (about 8 x 256-token documents): activations stay in cache.
CPU_BATCH_TOKENS = 2048
# On GPU: large enough that a 22M-parameter encoder's kernels fill the device (bench/gpu.py).
GPU_BATCH_TOKENS = 65536
# GPU batches pad to a multiple of this (tensor-core friendly shapes, fewer distinct kernel shapes).
_GPU_PAD_MULTIPLE = 8


def batch_tokens_for(cfg: EmbedConfig, device: str) -> int:
    if cfg.batch_tokens != "auto":
        return int(cfg.batch_tokens)
    return CPU_BATCH_TOKENS if device == "cpu" else GPU_BATCH_TOKENS


def ray_batch_docs(cfg: EmbedConfig, use_gpu: bool) -> int:
    """Documents per Ray batch: several encoder batches (about 128 tokens per document assumed), so the
    length sort inside a batch has room to group similar lengths."""
    return max(4 * cfg.batch_size, 4 * batch_tokens_for(cfg, "cuda" if use_gpu else "cpu") // 128)


def token_budget_batches(lengths: np.ndarray, batch_tokens: int, max_rows: int, multiple: int = 1) -> list[np.ndarray]:
    """Row groups, longest first, each within ``max_rows`` rows and ``batch_tokens`` padded tokens.

    A group is padded to its longest row rounded up to ``multiple``; sorted longest first, that is its
    first row. A row longer than the budget gets a group of its own.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        width = -(-max(1, int(lengths[order[start]])) // multiple) * multiple
        end = min(len(order), start + max(1, min(batch_tokens // width, max_rows)))
        batches.append(order[start:end])
        start = end
    return batches


def resolve_embed_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    return getattr(torch, dtype)


class Embedder:
    """Holds the encoder; ``__call__`` adds an ``embedding`` column (L2-normalised float32).

    Takes a batch's ``_token_ids`` when the tokenize stage ran before it (and drops that column), else
    tokenises ``text`` itself. :meth:`encode` (texts) and :meth:`encode_ids` (token ids) give the same vectors.
    """

    def __init__(self, cfg: EmbedConfig, device: str = "auto"):
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg
        self.device = resolve_device(device)
        self.dtype = resolve_embed_dtype(cfg.dtype, self.device)
        self.model = SentenceTransformer(resolve_encoder_path(cfg.model), device=self.device)
        self.model.max_seq_length = min(cfg.max_seq_length, self.model.max_seq_length or cfg.max_seq_length)
        # Only the transformer body runs in half precision; pooling and any later modules get float32 input.
        self.model[0].to(self.dtype)
        self.model.eval()
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim_of()
        self.tokenizer = EncoderTokenizer(self.model.tokenizer, self.model.max_seq_length)
        self.pad_id = int(self.model.tokenizer.pad_token_id or 0)
        self.batch_tokens = batch_tokens_for(cfg, self.device)
        on_cpu = self.device == "cpu"
        self.max_rows = cfg.batch_size if on_cpu else max(1, self.batch_tokens // 8)
        self.pad_multiple = 1 if on_cpu else _GPU_PAD_MULTIPLE
        log.info("embedder: %s on %s (%s), batches of <= %d padded tokens", cfg.model, self.device,
                 str(self.dtype).removeprefix("torch."), self.batch_tokens)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode_ids(self.tokenizer(texts))

    def encode_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Vectors for documents given as encoder input ids (special tokens included), in input order."""
        import torch

        n = len(ids)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = [np.asarray(i, dtype=np.int64) for i in ids]
        lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=n)
        out = torch.empty((n, self.dim), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for rows in token_budget_batches(lengths, self.batch_tokens, self.max_rows, self.pad_multiple):
                input_ids, mask = self._padded([ids[i] for i in rows], lengths[rows])
                vectors = self._forward(input_ids, mask)
                out[torch.from_numpy(rows).to(self.device)] = vectors
        return np.ascontiguousarray(out.cpu().numpy())

    def _padded(self, ids: list[np.ndarray], lengths: np.ndarray):
        import torch

        width = -(-max(1, int(lengths.max())) // self.pad_multiple) * self.pad_multiple
        rows = np.repeat(np.arange(len(ids)), lengths)
        cols = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        input_ids[rows, cols] = np.concatenate(ids) if ids else []
        mask[rows, cols] = 1
        return torch.from_numpy(input_ids).to(self.device), torch.from_numpy(mask).to(self.device)

    def _forward(self, input_ids, mask):
        import torch

        features = self.model[0]({"input_ids": input_ids, "attention_mask": mask})
        features["token_embeddings"] = features["token_embeddings"].float()
        for module in list(self.model)[1:]:
            features = module(features)
        return torch.nn.functional.normalize(features["sentence_embedding"].float(), dim=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch.pop(TOKEN_IDS, None)
        if ids is not None:
            batch[EMBEDDING] = self.encode_ids(list(ids))
        else:
            batch[EMBEDDING] = self.encode([str(t) for t in batch[TEXT]])
        return batch
