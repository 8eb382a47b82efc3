"""Near-duplicate check for the select stage: is a candidate too close to a document already selected?

The rule (``select.dedup_threshold``): a candidate is skipped when the dot product of its embedding with an
already selected document's embedding (the cosine, for the encoder's unit vectors) is above the threshold.
Comparing each try with every selected row costs O(selected x dim) per try: about a minute at budget 20,000
from 100,000 candidates. :class:`NearDuplicates` gives the same answers in seconds:

- Each vector e is split into its coordinates z on the candidates' top principal directions and the norm of
  the rest r, so z_i . z_j + |r_i| |r_j| bounds e_i . e_j from above (Cauchy-Schwarz). One short product per
  selected row rules out nearly every pair; the pairs left are decided with the full vectors.
- A pair is always decided by the same float64 dot product of the stored float32 vectors, so the answer does
  not depend on which rows were compared together, or when.
- A candidate remembers how many selected rows it was checked against, so asking again (the fill pass)
  checks only the rows selected since. Told the order the selector will ask in (:meth:`expect`), a
  query brings the next few expected candidates up to date too, in one matrix product: the selected rows
  are read once per block instead of once per try.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import pyarrow as pa

PROJECTED_DIMS = 64
_BASIS_SAMPLE = 20_000  # rows the principal directions are estimated from; any basis keeps the bound exact
_SLACK = 1e-4  # relative slack added to the bound, far above its float32 rounding (about 1e-6)
_CHUNK = 8192
_BLOCK = 32  # expected candidates checked together
_CATCH_UP_ROWS = 64  # below this many unchecked selected rows, a candidate is checked on its own


def embedding_matrix(column: Union[pa.Array, pa.ChunkedArray]) -> np.ndarray:
    """(rows, dim) float32 array of a fixed-size-list, list or tensor-extension column.

    No copy for one chunk of float32 values; an error naming the column for nulls or ragged rows.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if isinstance(column.type, pa.ExtensionType):
        column = column.storage
    n = len(column)
    if column.null_count:
        raise ValueError(f"column embedding: {column.null_count} of {n} rows are null")
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = np.diff(column.offsets.to_numpy())
        dim = int(lengths[0]) if n else 0
        if n and (lengths != dim).any():
            raise ValueError(f"column embedding: rows have {sorted(set(lengths.tolist()))[:3]}... values, "
                             "expected one length")
    else:
        raise ValueError(f"column embedding: expected a list of floats per row, got {column.type}")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(n, dim)


def _squared_norms(x: np.ndarray) -> np.ndarray:
    out = np.empty(len(x), np.float64)
    for a in range(0, len(x), _CHUNK):
        block = x[a:a + _CHUNK].astype(np.float64)
        out[a:a + _CHUNK] = np.einsum("ij,ij->i", block, block)
    return out


def bounding_vectors(emb: np.ndarray, dims: int = PROJECTED_DIMS) -> np.ndarray:
    """Short vectors s with s_i . s_j >= e_i . e_j for every pair: [z, |r|, sqrt(slack) |e|].

    z are the coordinates on the top ``dims`` principal directions of ``emb`` (estimated on a strided
    sample), |r| the norm of the rest, and the slack term covers the rounding of the short product.
    """
    n, d = emb.shape
    m = min(dims, d)
    sample = emb[:: max(1, n // _BASIS_SAMPLE)].astype(np.float64)
    _, vectors = np.linalg.eigh(sample.T @ sample)
    basis = np.ascontiguousarray(vectors[:, ::-1][:, :m], dtype=np.float32)
    z = emb @ basis
    total = _squared_norms(emb)
    # |r|^2 = |e|^2 - |z|^2; the 1e-6 |e|^2 covers its float32 rounding, so |r| is never underestimated.
    rest = np.sqrt(np.maximum(total - _squared_norms(z), 0.0) + 1e-6 * total)
    return np.ascontiguousarray(np.column_stack([z, rest, np.sqrt(_SLACK * total)]), dtype=np.float32)


def exact_dots(emb: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The dot products that decide, pair by pair: float64 over the stored float32 vectors."""
    return np.einsum("ij,ij->i", emb[left].astype(np.float64), emb[right].astype(np.float64))


class NearDuplicates:
    """Which candidates are near-duplicates of the rows selected so far (:meth:`add` records a selection)."""

    def __init__(self, emb: np.ndarray, threshold: float, capacity: int = 1024):
        self.emb = emb
        self.threshold = float(threshold)
        self.short = bounding_vectors(emb)
        self.selected = np.empty((max(1, capacity), self.short.shape[1]), np.float32)
        self.rows = np.empty(max(1, capacity), np.int64)
        self.count = 0
        self.checked = np.zeros(len(emb), np.int64)  # selected rows already ruled out, per candidate
        self.blocked = np.zeros(len(emb), dtype=bool)
        self.is_selected = np.zeros(len(emb), dtype=bool)
        self.expected = np.zeros(0, np.int64)
        self.position = np.full(len(emb), -1, np.int64)

    def expect(self, order) -> None:
        """The candidates the selector will most likely ask about, in order (a hint: any order stays exact)."""
        self.expected = np.asarray(order, dtype=np.int64)
        self.position[:] = -1
        self.position[self.expected[::-1]] = np.arange(len(self.expected))[::-1]

    def is_near_duplicate(self, i: int) -> bool:
        if self.blocked[i]:
            return True
        start, end = int(self.checked[i]), self.count
        if end - start >= _CATCH_UP_ROWS and self.position[i] >= 0 and not self.is_selected[i]:
            self._catch_up(self.expected[self.position[i]:self.position[i] + _BLOCK])
        elif start < end:
            self._check(i, start, self.selected[start:end] @ self.short[i])
            self.checked[i] = end
        return bool(self.blocked[i])

    def _catch_up(self, block: np.ndarray) -> None:
        """Check ``block`` against the selected rows each has not seen yet, in one product."""
        block = block[~self.blocked[block] & ~self.is_selected[block] & (self.checked[block] < self.count)]
        start, end = int(self.checked[block].min()), self.count
        bounds = self.short[block] @ self.selected[start:end].T
        for j in np.flatnonzero(bounds.max(axis=1) > self.threshold):
            i = int(block[j])
            seen = int(self.checked[i]) - start
            self._check(i, start + seen, bounds[j, seen:])
        self.checked[block] = end

    def _check(self, i: int, start: int, bounds: np.ndarray) -> None:
        """Decide the pairs (i, selected row start + r) whose bound is above the threshold."""
        close = np.flatnonzero(bounds > self.threshold)
        if close.size:
            pairs = self.rows[start + close]
            self.blocked[i] |= bool((exact_dots(self.emb, pairs, np.full_like(pairs, i)) > self.threshold).any())

    def add(self, i: int) -> None:
        if self.count == len(self.rows):
            self.selected = np.concatenate([self.selected, np.empty_like(self.selected)])
            self.rows = np.concatenate([self.rows, np.empty_like(self.rows)])
        self.selected[self.count] = self.short[i]
        self.rows[self.count] = i
        self.is_selected[i] = True
        self.count += 1


class ExhaustiveNearDuplicates:
    """The same rule, written plainly: every try compared with every selected row.

    ``dtype=np.float64`` decides like :class:`NearDuplicates` (tests compare the two); ``np.float32`` is the
    select stage's former arithmetic (``bench/select.py`` times it as the baseline).
    """

    def __init__(self, emb: np.ndarray, threshold: float, capacity: int = 0, dtype=np.float64):
        self.emb = emb.astype(dtype)
        self.threshold = float(threshold)
        self.chosen: list[int] = []

    def expect(self, order) -> None:
        pass

    def is_near_duplicate(self, i: int) -> bool:
        return bool(self.chosen) and float(np.max(self.emb[self.chosen] @ self.emb[i])) > self.threshold

    def add(self, i: int) -> None:
        self.chosen.append(i)


def near_duplicates(emb: Optional[np.ndarray], threshold: float, capacity: int, kind: type = NearDuplicates):
    """The check for a candidate table's vectors, or None when there are none (nothing is a duplicate)."""
    if emb is None or emb.size == 0:
        return None
    return kind(emb, threshold, capacity)
