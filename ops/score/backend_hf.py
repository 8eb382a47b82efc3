"""transformers scoring backend: a plain PyTorch forward of the decoder over packed or length-bucketed batches.

Packed (the GPU default): documents are laid first-fit into rows of ``window`` tokens, several per row, and
kept apart by position ids that restart at 0 for each document (transformers then builds a block-diagonal
causal mask, or uses variable-length flash attention); a batch carries no padding but the rows' tails. Whether
the model honours this is checked once at load (:meth:`HFBackend.packing_works`); when it does not, or with
``score.packing`` off, right-padded batches of similar lengths are used instead.

It returns the final (post-norm) hidden states of whole batches, documents back to back; the Scorer applies
the float32 output head chunk by chunk on the same device, so a batch never holds ``[batch, T, V]`` logits.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np
import torch

from labelnext.ops.score.head import OutputHead
from labelnext.ops.score.inputs import pack_by_tokens, pack_rows

log = logging.getLogger(__name__)

# Choices run after a prompt's cached keys/values at most this many at a time (the cache is copied per row).
_CHOICE_ROWS = 32


class HFBackend:
    name = "transformers"

    def __init__(self, model_dir: str, *, device: str, dtype: torch.dtype, batch_tokens: int, window: int,
                 packing: bool = True, compile: bool = False):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        self.batch_tokens = batch_tokens
        self.window = window
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.decoder = self.model.get_decoder()
        self.head = OutputHead.from_model(self.model)
        self.packed = packing and self.packing_works()
        if packing and not self.packed:
            log.warning("scorer: %s ignores restarting position ids; using length buckets instead of packed rows",
                        type(self.model).__name__)
        # Compiled only with packed rows: their shapes are static (rows rounded to a power of two, fixed width);
        # length buckets would recompile for every new width.
        self.compiled = compile and self.packed
        self._forward = torch.compile(self.decoder, dynamic=False) if self.compiled else self.decoder
        self._prefix = None  # (token ids, key/value cache) of the task prompt's shared instruction

    def _run(self, **inputs) -> torch.Tensor:
        try:
            return self._forward(**inputs, use_cache=False).last_hidden_state
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager model gives the same result
            if not self.compiled:
                raise
            log.warning("scorer: torch.compile failed (%s: %s); running eager", type(exc).__name__, exc)
            self.compiled, self._forward = False, self.decoder
            return self._forward(**inputs, use_cache=False).last_hidden_state

    @torch.inference_mode()
    def packing_works(self) -> bool:
        """Does a document packed after another give its hidden states alone? Compared against the leak a
        model that ignores the restart would show (the same tokens with continuing positions)."""
        vocab = self.head.vocab_size
        first = torch.arange(11, 18) % vocab
        second = torch.arange(101, 110) % vocab
        both = torch.cat([first, second])[None].to(self.device)
        alone = self.decoder(input_ids=second[None].to(self.device), use_cache=False).last_hidden_state[0]
        restart = torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None].to(self.device)
        cont = torch.arange(both.shape[1])[None].to(self.device)
        packed = self.decoder(input_ids=both, position_ids=restart, use_cache=False).last_hidden_state[0, len(first):]
        leaked = self.decoder(input_ids=both, position_ids=cont, use_cache=False).last_hidden_state[0, len(first):]
        gap = (packed.float() - alone.float()).abs().max().item()
        leak = (leaked.float() - alone.float()).abs().max().item()
        return leak > 0 and gap <= 0.1 * leak

    @torch.inference_mode()
    def hidden_batches(self, seqs: Sequence[Sequence[int]]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield ``(indices, hidden[sum of their lengths, H])``: every sequence once, back to back per batch."""
        if not seqs:
            return
        lengths = [len(s) for s in seqs]
        yield from (self._packed(seqs, lengths) if self.packed else self._bucketed(seqs, lengths))

    def _packed(self, seqs, lengths) -> Iterator[tuple[list[int], torch.Tensor]]:
        width = max(self.window, max(lengths))
        rows = pack_rows(lengths, width)
        per_batch = max(1, self.batch_tokens // width)
        for start in range(0, len(rows), per_batch):
            batch = rows[start:start + per_batch]
            n_rows = _static_rows(len(batch), per_batch) if self.compiled else len(batch)
            order = [i for row in batch for i in row]
            ids, positions, flat = _packed_layout(batch, [lengths[i] for i in order],
                                                  [seqs[i] for i in order], n_rows, width)
            hidden = self._run(input_ids=ids.to(self.device), position_ids=positions.to(self.device))
            yield order, hidden.reshape(-1, hidden.shape[-1])[flat.to(self.device)]

    def _bucketed(self, seqs, lengths) -> Iterator[tuple[list[int], torch.Tensor]]:
        for group in pack_by_tokens(lengths, self.batch_tokens):
            width = max(lengths[i] for i in group)
            ids = torch.zeros((len(group), width), dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : lengths[i]] = torch.as_tensor(seqs[i], dtype=torch.long)
                mask[row, : lengths[i]] = 1
            mask = mask.to(self.device)
            # Right padding: real positions never attend to padding under the causal mask.
            hidden = self._run(input_ids=ids.to(self.device), attention_mask=mask)
            yield group, hidden[mask.bool()]

    @torch.inference_mode()
    def choice_hidden(self, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[int]],
                      shared: int = 0) -> list[torch.Tensor]:
        """Per prompt, the hidden states at the positions that predict each choice's tokens, choices back to back.

        The first ``shared`` tokens (the instruction before the document, the same in every prompt) run once per
        backend and their key/value cache is reused. The rest of the prompts run as right-padded batches; each
        batch's cache is then copied once per choice, and the choices (all but their last token, a target only)
        run after it, at most ``_CHOICE_ROWS`` rows a call.
        """
        shared = min([shared, *(len(p) - 1 for p in prompts)])
        tails = [list(c[:-1]) for c in choices]
        per_call = max(1, _CHOICE_ROWS // len(choices))
        out: list[torch.Tensor] = []
        for start in range(0, len(prompts), per_call):
            group = [list(p) for p in prompts[start:start + per_call]]
            last, cache, mask = self._prompt_batch(group, shared)
            lengths = [len(p) for p in group]
            parts = [[last[g:g + 1]] for g in range(len(group))]
            for first in range(0, len(tails), _CHOICE_ROWS):
                chunk = tails[first:first + _CHOICE_ROWS]
                for g, hidden in self._choice_batch(cache, mask, lengths, chunk):
                    parts[g].append(hidden)
                if not max(len(tail) for tail in chunk):
                    for g in range(len(group)):
                        parts[g] += [last[g:g]] * len(chunk)
            # parts[g]: the prompt's last position, then per choice its own positions; reorder choice-major.
            for g, prompt_parts in enumerate(parts):
                pieces = []
                for c in range(len(tails)):
                    pieces += [last[g:g + 1], prompt_parts[1 + c]]
                out.append(torch.cat(pieces))
        return out

    def _prompt_batch(self, group: list[list[int]], shared: int):
        """The prompts after the shared prefix, right-padded: last positions' hidden states, the batch's cache and
        its attention mask (prefix included)."""
        import copy

        rests = [p[shared:] for p in group]
        width = max(len(r) for r in rests)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for g, rest in enumerate(rests):
            ids[g, :len(rest)] = torch.as_tensor(rest, dtype=torch.long)
            mask[g, shared:shared + len(rest)] = 1
        cache = None
        if shared:
            cache = copy.deepcopy(self._prefix_cache(group[0][:shared]))
            cache.batch_repeat_interleave(len(group))
        positions = (shared + torch.arange(width))[None].expand(len(group), width)
        out = self.decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                           position_ids=positions.to(self.device), past_key_values=cache, use_cache=True)
        ends = torch.as_tensor([len(r) - 1 for r in rests])
        return out.last_hidden_state[torch.arange(len(group)), ends.to(self.device)], out.past_key_values, mask

    def _choice_batch(self, cache, mask: torch.Tensor, lengths: list[int], tails: list[list[int]]):
        """``(prompt index, hidden [len(tail), H])`` for every prompt of the batch and every choice tail."""
        import copy

        width = max(len(t) for t in tails)
        if width == 0:  # one-token choices: the prompt's last position predicts them all
            return
        rows = len(lengths) * len(tails)
        ids = torch.zeros((rows, width), dtype=torch.long)
        full = torch.zeros((rows, mask.shape[1] + width), dtype=torch.long)
        full[:, :mask.shape[1]] = mask.repeat_interleave(len(tails), dim=0)
        positions = torch.zeros((rows, width), dtype=torch.long)
        for g, n in enumerate(lengths):
            for c, tail in enumerate(tails):
                r = g * len(tails) + c
                ids[r, :len(tail)] = torch.as_tensor(tail, dtype=torch.long)
                full[r, mask.shape[1]:mask.shape[1] + len(tail)] = 1
                positions[r] = n + torch.arange(width)
        copied = copy.deepcopy(cache)
        copied.batch_repeat_interleave(len(tails))
        hidden = self.decoder(input_ids=ids.to(self.device), attention_mask=full.to(self.device),
                              position_ids=positions.to(self.device), past_key_values=copied,
                              use_cache=True).last_hidden_state
        for g in range(len(lengths)):
            for c, tail in enumerate(tails):
                yield g, hidden[g * len(tails) + c, :len(tail)]

    def _prefix_cache(self, prefix: Sequence[int]):
        key = tuple(prefix)
        if self._prefix is None or self._prefix[0] != key:
            out = self.decoder(input_ids=torch.as_tensor([list(prefix)], device=self.device), use_cache=True)
            self._prefix = (key, out.past_key_values)
        return self._prefix[1]

    def close(self) -> None:
        self.model = self.decoder = self._forward = None


def _static_rows(n: int, cap: int) -> int:
    """Rows rounded up to a power of two (at most ``cap``): a compiled model sees a few shapes, not one per batch."""
    return min(cap, 1 << max(0, n - 1).bit_length())


def _packed_layout(rows: list[list[int]], lengths: list[int], seqs: list[Sequence[int]], n_rows: int,
                   width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``position_ids`` ``[n_rows, width]`` for documents laid out row by row (``lengths`` and
    ``seqs`` in that order), and the flat index of every document position in that order.

    Positions restart at 0 for every document and for each row's padding tail, so padding is a sequence of
    its own that no document attends to.
    """
    lengths_np = np.asarray(lengths, dtype=np.int64)
    doc_row = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    # Column where each document starts: cumulative length within its row.
    ends = np.cumsum(lengths_np)
    row_first = np.cumsum([0] + [len(r) for r in rows])[:-1]
    row_base = np.repeat(ends[row_first] - lengths_np[row_first], [len(r) for r in rows])
    doc_start = ends - lengths_np - row_base
    tok_row = np.repeat(doc_row, lengths_np)
    tok_col = np.arange(int(ends[-1])) - np.repeat(ends - lengths_np, lengths_np) + np.repeat(doc_start, lengths_np)
    used = np.zeros(n_rows, dtype=np.int64)
    np.add.at(used, doc_row, lengths_np)
    # Every cell starts as padding (positions counted from the row's used length), then documents overwrite.
    start = np.broadcast_to(used[:, None], (n_rows, width)).copy()
    start[tok_row, tok_col] = np.repeat(doc_start, lengths_np)
    positions = np.arange(width)[None, :] - start
    ids = np.zeros((n_rows, width), dtype=np.int64)
    ids[tok_row, tok_col] = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
    flat = tok_row * width + tok_col
    return torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(flat)
