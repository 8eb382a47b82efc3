"""Vectors a corpus already carries (``input.embedding_column``): type checks, the expected dimension, and
per-row validation so a bad vector is a counted rejection like any bad row.

Vectors are L2-normalised on the way in: clustering, assignment and near-duplicate checks all use cosine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REJECT_NULL_EMBEDDING = "null_embedding"
REJECT_EMBEDDING_DIM = "wrong_embedding_dimension"
REJECT_NON_FINITE_EMBEDDING = "non_finite_embedding"
REJECT_ZERO_EMBEDDING = "zero_embedding"


def type_problem(vector_type: pa.DataType) -> Optional[str]:
    """Why a column of this type cannot hold vectors, or None when it can (a list of numbers)."""
    if not (pa.types.is_list(vector_type) or pa.types.is_large_list(vector_type)
            or pa.types.is_fixed_size_list(vector_type)):
        return f"must be a list of floats, found {vector_type}"
    value_type = vector_type.value_type
    if not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
        return f"must be a list of floats, found a list of {value_type}"
    return None


def fixed_dimension(vector_type: pa.DataType) -> Optional[int]:
    """The dimension a fixed-size list type declares, else None."""
    return vector_type.list_size if pa.types.is_fixed_size_list(vector_type) else None


def first_dimension(column: pa.Array) -> Optional[int]:
    """Length of the first non-null vector in a (chunk of a) list column."""
    lengths = pc.drop_null(pc.list_value_length(column))
    return int(lengths[0].as_py()) if len(lengths) else None


def encoder_dimension(model: str) -> Optional[int]:
    """Output dimension of the configured sentence encoder (``embed.model``), read from its config files (no
    weights loaded); None when the model is not a local folder or its files do not say."""
    from labelnext.ops.core.model_prep import ModelPrepError, resolve_encoder_path

    try:
        root = Path(resolve_encoder_path(model))
        modules = json.loads((root / "modules.json").read_text())
    except (ModelPrepError, OSError, ValueError):
        return None
    dim = None
    for module in modules:
        try:
            config = json.loads((root / module.get("path", "") / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if module.get("type", "").endswith("Pooling"):
            dim = config.get("word_embedding_dimension", dim)
        elif module.get("type", "").endswith("Dense"):
            dim = config.get("out_features", dim)
    return int(dim) if dim else None


def validate_vectors(column: pa.Array, dim: int) -> tuple[np.ndarray, list[Optional[str]]]:
    """(unit vectors [n, dim] float32, per-row reject reason or None); rejected rows hold zeros."""
    n = len(column)
    null = column.is_null().to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(column).fill_null(-1).to_numpy(zero_copy_only=False)
    right_size = ~null & (lengths == dim)
    values = column.filter(pa.array(right_size)).flatten()
    # Null elements inside a vector come out as NaN and are rejected with the non-finite ones.
    rows = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64).reshape(-1, dim)
    finite = np.isfinite(rows).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], rows, 0.0), axis=1)
    nonzero = norms > 0
    good = finite & nonzero
    out = np.zeros((n, dim), dtype=np.float32)
    where = np.flatnonzero(right_size)
    out[where[good]] = (rows[good] / norms[good, None]).astype(np.float32)
    reasons: list[Optional[str]] = [None] * n
    for i in np.flatnonzero(null):
        reasons[i] = REJECT_NULL_EMBEDDING
    for i in np.flatnonzero(~null & ~right_size):
        reasons[i] = REJECT_EMBEDDING_DIM
    for i in where[~finite]:
        reasons[i] = REJECT_NON_FINITE_EMBEDDING
    for i in where[finite & ~nonzero]:
        reasons[i] = REJECT_ZERO_EMBEDDING
    return out, reasons
