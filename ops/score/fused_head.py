"""Output head and exact entropy fused: per-position entropy and NLL straight from final hidden states.

The vocabulary is walked in chunks with an online log-sum-exp (the approach of fused linear cross-entropy
kernels): for a block of positions, each chunk of the head's rows gives a ``[rows, chunk]`` logit tile that
updates a running max ``m``, ``S = sum exp(z - m)`` and ``B = sum exp(z - m) (z - m)``, all float32. At the end
``H = log S - B / S`` and ``NLL = log S + m - z[target]``. Neither a ``[T, V]`` logit matrix nor a
``[chunk_T, V]`` one ever exists, only tiles (on CPU about the size of a core's cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labelnext.ops.score.head import OutputHead


@dataclass(frozen=True)
class Tiles:
    """Positions and vocabulary entries of one logit tile."""

    rows: int
    vocab: int


# CPU: 1,024 x 4,096 float32 tiles (16 MB) for a 576-wide, 49,152-entry head on a shared 2-core machine: never
# slower than 512 x 8,192 or 2,048 x 2,048 beyond the noise; 256 x 1,024 was 2-4x slower (more, smaller matmuls).
# GPU: 256 MB tiles, few kernel launches (not yet measured against other shapes).
CPU_TILES = Tiles(rows=1024, vocab=4096)
GPU_TILES = Tiles(rows=8192, vocab=8192)


def tiles_for(device: torch.device | str) -> Tiles:
    return CPU_TILES if torch.device(device).type == "cpu" else GPU_TILES


def fused_entropy_nll(hidden: torch.Tensor, targets: torch.Tensor, head: OutputHead,
                      tiles: Tiles | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position Shannon entropy (nats) and NLL of ``targets`` for ``hidden`` ``[T, H]`` through ``head``.

    Any float dtype in (the hidden states are cast to float32 one block at a time); two float32 ``[T]`` tensors
    out, on the head's device. Agrees with ``hidden_entropy_nll(hidden, targets, head=head)`` to float32
    rounding.
    """
    tiles = tiles or tiles_for(head.device)
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [T, H] and targets [T], got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    targets = targets.to(head.device, torch.long)
    ent, nll = [], []
    for start in range(0, hidden.shape[0], max(1, tiles.rows)):
        block = hidden[start:start + tiles.rows].to(head.device, torch.float32)
        e, n = _block_entropy_nll(block, targets[start:start + tiles.rows], head, max(1, tiles.vocab))
        ent.append(e)
        nll.append(n)
    if not ent:
        empty = torch.zeros(0, dtype=torch.float32, device=head.device)
        return empty, empty.clone()
    return torch.cat(ent), torch.cat(nll)


def _logit_tile(hidden: torch.Tensor, head: OutputHead, lo: int, hi: int) -> torch.Tensor:
    """``head(hidden)[:, lo:hi]``, computed from those rows of the head only."""
    z = hidden @ head.weight[lo:hi].T
    if head.bias is not None:
        z += head.bias[lo:hi]
    if head.scale != 1.0:
        z *= head.scale
    if head.softcap is not None:
        z.div_(head.softcap).tanh_().mul_(head.softcap)
    return z


def _block_entropy_nll(hidden: torch.Tensor, targets: torch.Tensor, head: OutputHead,
                       vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    total = head.vocab_size
    m = s = b = None
    target_logit = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for lo in range(0, total, vocab):
        hi = min(total, lo + vocab)
        z = _logit_tile(hidden, head, lo, hi)
        local = targets - lo
        hit = (local >= 0) & (local < hi - lo)
        picked = z.gather(1, local.clamp(0, hi - lo - 1).unsqueeze(1)).squeeze(1)
        target_logit = torch.where(hit, picked, target_logit)
        tile_max = z.amax(dim=1)
        new_m = tile_max if m is None else torch.maximum(m, tile_max)
        z -= new_m.unsqueeze(1)
        e = z.exp()
        tile_s, tile_b = e.sum(dim=1), torch.linalg.vecdot(e, z)
        if m is None:
            s, b = tile_s, tile_b
        else:
            # Rescale the running sums from the old max to the new one: exp(z - m') (z - m') =
            # a exp(z - m) ((z - m) + (m - m')) with a = exp(m - m') <= 1.
            shift = m - new_m
            a = shift.exp()
            b = a * (b + shift * s) + tile_b
            s = a * s + tile_s
        m = new_m
    log_s = s.log()
    return log_s - b / s, log_s + m - target_logit
