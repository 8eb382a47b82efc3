"""Exact per-token predictive entropy and NLL over the full vocabulary, and per-document reductions.

Position ``t`` of a ``[T, V]`` logit matrix is the model's next-token distribution after reading tokens
``0..t``; its target is token ``t + 1``. Everything is computed in float32 from max-shifted logits
(``H = log Z - sum(p z)``, ``NLL = log Z - z[target]``) and in chunks of positions, so a long document with a
large vocabulary never materialises more than ``chunk x V`` floats at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

DEFAULT_CHUNK = 256


@dataclass(frozen=True)
class DocStats:
    mean_entropy: float
    max_entropy: float
    nll: float
    n_tokens: int


EMPTY = DocStats(math.nan, math.nan, math.nan, 0)


# Rows of float32 logits whose statistics are computed together on CPU: about 1.5 MB, so the passes over one
# block (max, exp, sum, dot) stay in the core's cache instead of streaming a [chunk, V] matrix from memory
# several times (bench/score.py: the post-head cost drops about 3x at V = 49k).
_CPU_STATS_BYTES = 3 << 19


def _entropy_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H = log Z - sum(p * z) and NLL = log Z - z[target], with z = logits - max (no log_softmax matrix)."""
    logits = logits.float()
    z = logits - logits.amax(dim=-1, keepdim=True)
    e = z.exp()
    total = e.sum(dim=-1)
    # -inf logits (masked vocabulary entries) have e = 0; clamping z makes their e * z term 0 rather than NaN.
    z.clamp_(min=torch.finfo(torch.float32).min)
    log_total = total.log()
    entropy = log_total - torch.linalg.vecdot(e, z) / total
    nll = log_total - z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return entropy, nll


def _block_entropy_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.device.type != "cpu":
        return _entropy_nll(logits, targets)
    rows = max(1, _CPU_STATS_BYTES // (4 * max(1, logits.shape[-1])))
    if logits.shape[0] <= rows:
        return _entropy_nll(logits, targets)
    parts = [_entropy_nll(logits[i:i + rows], targets[i:i + rows]) for i in range(0, logits.shape[0], rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def token_entropy_nll(
    logits, targets, *, chunk: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position Shannon entropy (nats) and NLL of ``targets`` for ``logits`` of shape ``[T, V]``.

    Accepts torch tensors or numpy arrays (logits or log-probabilities: ``log_softmax`` is idempotent).
    Returns two float32 tensors of shape ``[T]`` on the logits' device.
    """
    logits = torch.as_tensor(logits)
    targets = torch.as_tensor(targets, device=logits.device)
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [T, V] and targets [T], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    return hidden_entropy_nll(logits, targets, head=None, chunk=chunk)


def hidden_entropy_nll(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    head: Optional[Callable[[torch.Tensor], torch.Tensor]],
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`token_entropy_nll` but ``hidden`` is ``[T, H]`` and ``head`` maps a chunk to logits.

    The logits of one chunk of positions exist only inside the loop, so memory is ``chunk x V``.
    """
    n = hidden.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return empty, empty.clone()
    ent, nll = [], []
    for start in range(0, n, max(1, chunk)):
        block = hidden[start:start + chunk]
        logits = head(block) if head is not None else block
        e, l = _block_entropy_nll(logits, targets[start:start + chunk])
        ent.append(e)
        nll.append(l)
    return torch.cat(ent), torch.cat(nll)


def reduce_doc(entropy, nll) -> DocStats:
    """Per-document stats from per-position entropy and NLL (empty input -> NaN stats, 0 tokens)."""
    entropy = np.asarray(torch.as_tensor(entropy).detach().cpu(), dtype=np.float64)
    nll = np.asarray(torch.as_tensor(nll).detach().cpu(), dtype=np.float64)
    if entropy.size == 0:
        return EMPTY
    return DocStats(float(entropy.mean()), float(entropy.max()), float(nll.mean()), int(entropy.size))


def segment_stats(entropy: torch.Tensor, nll: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-document ``[mean entropy, max entropy, mean NLL]`` (float64, ``[D, 3]``) on the positions' device.

    ``entropy``/``nll`` hold the positions of ``D`` documents back to back, ``lengths[d] >= 1`` of them for
    document ``d``: one reduction for a whole batch instead of one host round trip per document. Sums are
    float64, as :func:`reduce_doc` computes them.
    """
    n_docs = int(lengths.shape[0])
    doc = torch.repeat_interleave(torch.arange(n_docs, device=entropy.device), lengths.to(entropy.device))
    sums = torch.zeros((2, n_docs), dtype=torch.float64, device=entropy.device)
    sums[0].index_add_(0, doc, entropy.double())
    sums[1].index_add_(0, doc, nll.double())
    peak = torch.full((n_docs,), -math.inf, dtype=torch.float32, device=entropy.device)
    peak = peak.scatter_reduce(0, doc, entropy.float(), reduce="amax")
    counts = lengths.to(entropy.device, torch.float64)
    return torch.stack([sums[0] / counts, peak.double(), sums[1] / counts], dim=1)
