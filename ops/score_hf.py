"""transformers scoring backend: a plain PyTorch forward of the decoder, padded batches packed by tokens.

It returns the final (post-norm) hidden states; the Scorer applies the float32 output head chunk by chunk,
so a batch never holds ``[batch, T, V]`` logits.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import torch

from labelnext.ops.score_head import OutputHead
from labelnext.ops.score_inputs import pack_by_tokens

log = logging.getLogger(__name__)


class HFBackend:
    name = "transformers"

    def __init__(self, model_dir: str, *, device: str, dtype: torch.dtype, batch_tokens: int):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        self.batch_tokens = batch_tokens
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.decoder = self.model.get_decoder()
        self.head = OutputHead.from_model(self.model)

    @torch.inference_mode()
    def hidden_states(self, seqs: Sequence[Sequence[int]]) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(index, hidden[L, H])`` for every sequence, in length-sorted batches."""
        lengths = [len(s) for s in seqs]
        for group in pack_by_tokens(lengths, self.batch_tokens):
            width = max(lengths[i] for i in group)
            ids = torch.zeros((len(group), width), dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : lengths[i]] = torch.as_tensor(seqs[i], dtype=torch.long)
                mask[row, : lengths[i]] = 1
            # Right padding: real positions never attend to padding under the causal mask.
            out = self.decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
            hidden = out.last_hidden_state
            for row, i in enumerate(group):
                yield i, hidden[row, : lengths[i]]

    def close(self) -> None:
        self.model = self.decoder = None
