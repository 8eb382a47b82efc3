"""The model's answer at a task prompt's answer position: choice log-probabilities and their uncertainty.

With choices, a choice's probability is that of its whole token sequence after the prompt (the product of its
tokens' next-token probabilities), normalised over the choices and, optionally, calibrated by the distribution
the same prompt gives a content-free document (Zhao et al. 2021). Without choices (a generative task) the
uncertainty is the exact full-vocabulary entropy of the first answer token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import numpy as np

from labelnext.ops.core.columns import LLM_LABEL, LLM_MARGIN, LLM_PROBS
from labelnext.ops.score.entropy import hidden_entropy_nll

if TYPE_CHECKING:
    import pyarrow as pa
    import torch



def choice_targets(prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[int]]):
    """For every (prompt, choice) sequence ``prompt + choice[:-1]`` (the last choice token is only a target):
    the sequences, and per sequence the offsets of the positions that predict a choice token."""
    seqs, starts = [], []
    for prompt in prompts:
        for choice in choices:
            seqs.append(list(prompt) + list(choice[:-1]))
            starts.append(len(prompt) - 1)
    return seqs, starts


def choice_logprobs_from_hidden(batches: Iterable[tuple[list[int], "torch.Tensor"]], seqs: Sequence[Sequence[int]],
                                starts: Sequence[int], choices: Sequence[Sequence[int]], head, chunk: int) -> np.ndarray:
    """Sum of log-probabilities of each sequence's choice tokens, from ``(indices, hidden)`` batches of whole
    sequences laid back to back (what the engines' hidden-state paths yield)."""
    import torch

    n_choices = len(choices)
    out = np.zeros(len(seqs), dtype=np.float64)
    for group, hidden in batches:
        rows, targets, owner = [], [], []
        offset = 0
        for j in group:
            choice = choices[j % n_choices]
            rows.extend(range(offset + starts[j], offset + starts[j] + len(choice)))
            targets.extend(choice)
            owner.extend([j] * len(choice))
            offset += len(seqs[j])
        device = hidden.device
        _, nll = hidden_entropy_nll(hidden[torch.as_tensor(rows, device=device)],
                                    torch.as_tensor(targets, device=device), head=head, chunk=chunk)
        np.add.at(out, np.asarray(owner), -nll.double().cpu().numpy())
    return out


def choice_logprobs_reusing_prompt(choice_hidden, prompts: Sequence[Sequence[int]],
                                   choices: Sequence[Sequence[int]], head, chunk: int) -> np.ndarray:
    """``[len(prompts), len(choices)]`` summed choice log-probabilities, each prompt run once:
    ``choice_hidden(prompts, choices)`` gives, per prompt, the hidden states at the positions that predict each
    choice's tokens, choices back to back (the transformers backend reuses the prompts' key/value caches)."""
    import torch

    lengths = [len(c) for c in choices]
    owner = np.repeat(np.arange(len(choices)), lengths)
    targets = [t for c in choices for t in c]
    out = np.zeros((len(prompts), len(choices)), dtype=np.float64)
    for i, hidden in enumerate(choice_hidden(prompts, choices)):
        _, nll = hidden_entropy_nll(hidden, torch.as_tensor(targets, device=hidden.device), head=head, chunk=chunk)
        np.add.at(out[i], owner, -nll.double().cpu().numpy())
    return out


def answer_entropy_from_hidden(batches: Iterable[tuple[list[int], "torch.Tensor"]], seqs: Sequence[Sequence[int]],
                               head, chunk: int) -> np.ndarray:
    """Entropy (nats) of the next-token distribution at each sequence's last position."""
    import torch

    out = np.full(len(seqs), np.nan)
    for group, hidden in batches:
        ends = np.cumsum([len(seqs[j]) for j in group]) - 1
        device = hidden.device
        last = hidden[torch.as_tensor(ends, device=device)]
        entropy, _ = hidden_entropy_nll(last, torch.zeros(len(group), dtype=torch.long, device=device), head=head,
                                        chunk=chunk)
        out[np.asarray(group)] = entropy.double().cpu().numpy()
    return out


def normalise(logp: np.ndarray, calibration: Optional[np.ndarray] = None) -> np.ndarray:
    """Probabilities over choices (rows) from summed log-probabilities; divided by ``calibration`` (the
    content-free distribution) and renormalised when given."""
    z = logp - logp.max(axis=-1, keepdims=True)
    if calibration is not None:
        z = z - np.log(np.clip(calibration, 1e-300, None))
        z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def choice_stats(probs: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Entropy (nats), top-1 minus top-2 margin, most probable name and the probabilities, per row."""
    entropy = -(probs * np.log(np.clip(probs, 1e-300, None))).sum(axis=1)
    top = -np.sort(-probs, axis=1)
    margin = top[:, 0] - (top[:, 1] if probs.shape[1] > 1 else 0.0)
    label = np.asarray(names, dtype=object)[np.argmax(probs, axis=1)] if len(probs) else np.empty(0, dtype=object)
    return {"uncertainty": entropy.astype(np.float32), LLM_MARGIN: margin.astype(np.float32), LLM_LABEL: label,
            LLM_PROBS: probs.astype(np.float32)}


def as_list_columns(table: "pa.Table") -> "pa.Table":
    """``llm_probs`` as ``list<float32>``: Ray Data carries the Scorer's ``[rows, choices]`` array as a tensor
    extension column, which readers of ``scores/`` and ``selected/`` should not need Ray to decode."""
    import pyarrow as pa

    if LLM_PROBS not in table.column_names:
        return table
    column = table.column(LLM_PROBS)
    if isinstance(column.type, pa.ExtensionType):
        values = np.concatenate([np.asarray(chunk.to_numpy_ndarray() if hasattr(chunk, "to_numpy_ndarray")
                                            else chunk.to_numpy(zero_copy_only=False)) for chunk in column.chunks]
                                ) if column.num_chunks else np.zeros((0, 0), np.float32)
        column = pa.array(list(np.asarray(values, dtype=np.float32)), pa.list_(pa.float32()))
    else:
        column = column.cast(pa.list_(pa.float32()))
    index = table.column_names.index(LLM_PROBS)
    return table.set_column(index, LLM_PROBS, column)
