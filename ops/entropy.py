"""Exact per-token predictive entropy and NLL over the full vocabulary, and per-document reductions.

Position ``t`` of a ``[T, V]`` logit matrix is the model's next-token distribution after reading tokens
``0..t``; its target is token ``t + 1``. Everything is computed in float32 with ``log_softmax`` and in
chunks of positions, so a long document with a large vocabulary never materialises more than
``chunk x V`` floats at once.
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


def _entropy_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    # -inf log-probs (masked vocabulary entries) become the most negative float so that p * log p is 0 * finite
    # = 0 rather than 0 * inf = NaN; in place, to keep one [chunk, V] temporary besides p.
    logp.clamp_(min=torch.finfo(torch.float32).min)
    entropy = -torch.linalg.vecdot(logp.exp(), logp)
    return entropy, nll


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
        e, l = _entropy_nll(logits, targets[start:start + chunk])
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
