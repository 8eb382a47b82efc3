"""Tokenize stage: the sentence encoder's input ids per document, computed on CPU workers before the encoder.

GPU embed actors then receive token ids instead of text: tokenising is CPU work that would otherwise leave
the GPU waiting, so it runs in parallel Ray Data tasks ahead of the actor pool. Only the tokenizer is loaded
(no weights). The ids are the encoder's own preprocessing (its tokenizer, truncated to its maximum sequence
length capped by ``embed.max_seq_length``), so :class:`~labelnext.ops.embed.encoder.Embedder` gives the same vector
for a document's ids as for its text (``tests/test_tokenize.py``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from labelnext.ops.core.columns import TEXT, TOKEN_IDS
from labelnext.ops.core.contract import StageContract
from labelnext.ops.core.model_prep import resolve_encoder_path

if TYPE_CHECKING:
    import pyarrow as pa

    from labelnext.ops.embed.settings import EmbedConfig

CONTRACT = StageContract("tokenize", needs=(TEXT,), adds=(TOKEN_IDS,))
# A tokenizer's "no limit" sentinel is a huge int (1e30); anything above this is treated as unset.
_NO_LIMIT = 1 << 20


class EncoderTokenizer:
    """Text -> int32 input ids (special tokens included), truncated to ``max_length``."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    @classmethod
    def for_encoder(cls, model: str, max_seq_length: int) -> "EncoderTokenizer":
        from transformers import AutoTokenizer

        module_dir = _transformer_dir(_local_dir(resolve_encoder_path(model)))
        tokenizer = AutoTokenizer.from_pretrained(str(module_dir))
        limit = _encoder_limit(module_dir, tokenizer)
        return cls(tokenizer, min(max_seq_length, limit) if limit else max_seq_length)

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not len(texts):
            return []
        ids = self.tokenizer([str(t) for t in texts], truncation="longest_first", max_length=self.max_length,
                             add_special_tokens=True)["input_ids"]
        return [np.asarray(i, dtype=np.int32) for i in ids]


def _local_dir(path: str) -> Path:
    """A folder as is; a hub id from the local Hugging Face cache (runs never download)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, local_files_only=True))


def _transformer_dir(model_dir: Path) -> Path:
    """The folder of a sentence-transformers model's Transformer module (its tokenizer lives there)."""
    modules = model_dir / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Transformer"):
                return model_dir / module.get("path", "")
    return model_dir


def _encoder_limit(module_dir: Path, tokenizer) -> Optional[int]:
    """The encoder's own maximum sequence length, as sentence-transformers resolves it."""
    for name in ("sentence_bert_config.json", "sentence_transformers_config.json"):
        path = module_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("max_seq_length")
            if value:
                return int(value)
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if value and value < _NO_LIMIT else None


@lru_cache(maxsize=4)
def _tokenizer(model: str, max_seq_length: int) -> EncoderTokenizer:
    # Ray reuses task worker processes: the tokenizer loads once per worker, not once per batch.
    return EncoderTokenizer.for_encoder(model, max_seq_length)


def ids_array(ids: Sequence[np.ndarray]) -> "pa.ListArray":
    """Variable-length id lists as one Arrow ``list<int32>`` column (offsets + one flat buffer)."""
    import pyarrow as pa

    lengths = np.fromiter((len(i) for i in ids), dtype=np.int32, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def tokenize_batch(table: "pa.Table", cfg: "EmbedConfig") -> "pa.Table":
    """Ray Data task: add the ``_token_ids`` column to a batch with ``text``."""
    ids = _tokenizer(cfg.model, cfg.max_seq_length)(table.column(TEXT).to_pylist())
    return table.append_column(TOKEN_IDS, ids_array(ids))


def tokenize_dataset(ds, cfg: "EmbedConfig", *, batch_size: int):
    """``ds`` with ``_token_ids`` added by CPU tasks (one CPU each, as many as the cluster's CPUs allow).

    Ahead of a GPU actor pool these run as separate tasks; ahead of a CPU pool with the same resources
    Ray Data fuses them into the actors (tokenising next to the encoder, as before).
    """
    return ds.map_batches(tokenize_batch, fn_kwargs={"cfg": cfg}, batch_size=batch_size, batch_format="pyarrow",
                          num_cpus=1)
