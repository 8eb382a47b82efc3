"""Scoring inputs: text -> LLM token ids (BOS, truncation), token-budget batches and packed rows.

Both backends receive the same ids from here, so their scores are comparable token for token.
The chat template is never applied: documents are scored as plain text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Encoded:
    ids: list[list[int]]        # model input per document, BOS included when the tokenizer has one
    truncated: list[bool]       # True when text tokens were dropped to fit the window


def bos_prefix(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [int(bos)] if bos is not None else []


def text_token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    # Special tokens are added by hand (bos_prefix) so a tokenizer that already adds BOS never doubles it.
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def truncate(ids: list[int], budget: int, mode: str) -> tuple[list[int], bool]:
    """Keep at most ``budget`` ids: the head, or half from the start and half from the end."""
    if len(ids) <= budget:
        return ids, False
    if mode == "head" or budget < 2:
        return ids[:budget], True
    if mode == "head_tail":
        head = (budget + 1) // 2
        return ids[:head] + ids[len(ids) - (budget - head):], True
    raise ValueError(f"unknown truncation mode {mode!r}")


def encode(tokenizer, texts: Sequence[str], *, window: int, truncation: str) -> Encoded:
    """Token ids for each text within ``window`` model positions (BOS counts towards the window)."""
    prefix = bos_prefix(tokenizer)
    budget = max(0, window - len(prefix))
    ids, flags = [], []
    for text_ids in text_token_ids(tokenizer, texts):
        kept, cut = truncate(text_ids, budget, truncation)
        ids.append(prefix + kept if kept else [])
        flags.append(cut)
    return Encoded(ids, flags)


def pack_by_tokens(lengths: Sequence[int], batch_tokens: int, max_padding: float = 0.25) -> list[list[int]]:
    """Group indices, shortest first, into padded batches.

    A group closes when adding the next (longer) sequence would make its padded size (count x longest)
    exceed ``batch_tokens`` or exceed its real tokens by more than ``max_padding``. A sequence longer than
    ``batch_tokens`` gets a group of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        # Sorted ascending, so lengths[i] is the longest of the group if it joins.
        padded = (len(current) + 1) * lengths[i]
        if current and (padded > batch_tokens or padded > (1 + max_padding) * (real + lengths[i])):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        groups.append(current)
    return groups


def split_by_tokens(lengths: Sequence[int], group_tokens: int) -> list[list[int]]:
    """Consecutive index groups of about ``group_tokens`` tokens each (no padding: for engines that pack)."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, n in enumerate(lengths):
        current.append(i)
        total += n
        if total >= group_tokens:
            groups.append(current)
            current, total = [], 0
    if current:
        groups.append(current)
    return groups


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: index rows of at most ``width`` tokens each, every sequence in exactly one row.

    Several documents share a row (kept apart by their position ids), so a batch of rows carries almost no
    padding. A sequence longer than ``width`` gets a row of its own.
    """
    import numpy as np

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free = np.empty(len(lengths), dtype=np.int64)  # remaining room per open row (at most one row per item)
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        fits = np.flatnonzero(free[: len(rows)] >= n) if rows else ()
        if len(fits):
            r = int(fits[0])
        else:
            r = len(rows)
            rows.append([])
            free[r] = max(width, n)
        rows[r].append(i)
        free[r] -= n
    return rows
