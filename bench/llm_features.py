"""The scoring LLM's view of each pool document for the loop's ``labelnext+probe`` strategy.

A document's feature vector is the mean of the final hidden states the product's ``Scorer`` computes for it (its
tokenizer and window, its backend): what a linear probe on the small LLM, trained on the labels so far, would
classify. Each dataset's pool is run once and cached next to the other bench caches.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bench.common import OUT, cache_key, log, save_array, slug

CACHE = OUT / "cache"
CHUNK_DOCS = 256  # documents per call to the engine: progress lines and bounded host memory


def cache_path(name: str, sha256: str, rows: np.ndarray, cfg) -> Path:
    key = cache_key(sha256, cfg.model, cfg.max_tokens, cfg.backend, cfg.dtype, np.asarray(rows).tobytes().hex())
    return CACHE / f"llmfeat-{slug(name)}-{key}.npy"


def llm_features(name: str, sha256: str, texts: list[str], rows: np.ndarray, cfg) -> np.ndarray:
    """[len(rows), hidden] float32: mean final hidden state of ``texts[i]`` for each row; cached by content."""
    path = cache_path(name, sha256, rows, cfg)
    if path.exists():
        return np.load(path)
    out = pooled_hidden_states(texts, cfg, name)
    save_array(path, out)
    return out


def pooled_hidden_states(texts: list[str], cfg, name: str = "") -> np.ndarray:
    """Mean over each document's positions of the ``Scorer`` engine's final hidden states (zeros when empty)."""
    import torch

    from labelnext.ops.score.scorer import Scorer

    scorer = Scorer(cfg, device="auto", num_cpus=os.cpu_count() or 1)
    try:
        enc = scorer.tokenize(texts)
        out: np.ndarray | None = None
        log(f"{name}: LLM features of {len(texts)} docs with {cfg.model}")
        with torch.inference_mode():
            for start in range(0, len(texts), CHUNK_DOCS):
                todo = [i for i in range(start, min(start + CHUNK_DOCS, len(texts))) if len(enc.ids[i]) > 0]
                seqs = [list(enc.ids[i]) for i in todo]
                for group, hidden in scorer.engine.hidden_batches(seqs):
                    pooled = torch.stack([h.float().mean(0) for h in torch.split(
                        hidden, [len(seqs[j]) for j in group])]).cpu().numpy()
                    if out is None:
                        out = np.zeros((len(texts), pooled.shape[1]), np.float32)
                    out[[todo[j] for j in group]] = pooled
                log(f"{name}: LLM features {min(start + CHUNK_DOCS, len(texts))}/{len(texts)}")
    finally:
        scorer.close()
    if out is None:
        raise ValueError(f"{name}: no document has a token for the LLM")
    return out
