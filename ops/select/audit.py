"""The audit sample: a uniform random share of a night's budget, and the unbiased estimate it gives once labelled.

Cluster-Margin picks the documents the task model finds hard, so accuracy measured on the labels it chose (or
cross-validated on them) is biased low and says little about the corpus. An audit document is drawn uniformly
from the night's eligible pool, and its prediction is recorded before anyone labels it, so once its label comes
back it is a fair test of the model that existed that night: accuracy and macro-F1 over the corpus, with an
interval. Everything here is numpy on label-sized arrays; the draw itself runs per block (``block_smallest``).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Optional

import numpy as np
import pyarrow as pa

from labelnext.ops.core.columns import DOC_ID

AUDIT = "audit"  # the rule of audit rows in selected/ and the ledger
AUDIT_KEY = "_audit_key"


def audit_size(budget: int, share: float) -> int:
    """Audit documents in a night of ``budget``: the share rounded half up, at least one when the share is set
    and the budget leaves room for a document picked actively."""
    if share <= 0 or budget < 2:
        return 0
    return int(min(budget - 1, max(1, np.floor(budget * share + 0.5))))


def audit_salt(seed: int, run_date: str) -> bytes:
    """The draw depends on the night and ``select.seed`` only: a rerun or backfill of the night draws the same
    documents whatever its run id."""
    return hashlib.blake2b(f"audit:{seed}:{run_date}".encode(), digest_size=16).digest()


def audit_keys(doc_ids: list[str], salt: bytes) -> np.ndarray:
    """A uniform 64-bit key per document; the ``n`` smallest keys of the pool are a uniform sample of ``n``."""
    return np.array([int.from_bytes(hashlib.blake2b(d.encode("utf-8"), digest_size=8, key=salt).digest(), "little")
                     for d in doc_ids], dtype=np.uint64)


def block_smallest(table: pa.Table, n: int, salt: bytes) -> pa.Table:
    """Ray Data batch function: the block's ``n`` rows with the smallest audit keys (``_audit_key`` added).

    The global sample is the ``n`` smallest of these per-block survivors: at most blocks x n rows reach a merge.
    """
    keys = audit_keys([str(d) for d in table.column(DOC_ID).to_pylist()], salt)
    table = table.append_column(AUDIT_KEY, pa.array(keys, pa.uint64()))
    return smallest(table, n)


def smallest(table: pa.Table, n: int) -> pa.Table:
    if table.num_rows <= n:
        return table
    order = np.lexsort((np.asarray(table.column(DOC_ID).to_pylist(), dtype=object).astype(str),
                        table.column(AUDIT_KEY).to_numpy()))
    return table.take(pa.array(order[:n], pa.int64()))


@dataclass(frozen=True)
class AuditEstimate:
    """The audited model's accuracy and macro-F1 on ``n`` labelled audit documents, each with its interval."""

    n: int
    accuracy: float
    accuracy_low: float
    accuracy_high: float
    macro_f1: float
    macro_f1_low: float
    macro_f1_high: float
    confidence: float

    def as_dict(self) -> dict:
        return asdict(self)


def wilson(correct: float, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a proportion: keeps its coverage at small n and near 0 or 1."""
    if n == 0:
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-F1 over the classes of ``y_true`` (a predicted class nobody has only costs the others precision)."""
    return float(_macro_f1_resampled(*_encode(y_true, y_pred), np.arange(len(y_true))[None, :])[0])


def estimate(y_true, y_pred, confidence: float = 0.95, resamples: int = 2000,
             seed: int = 0) -> Optional[AuditEstimate]:
    """Accuracy (Wilson interval) and macro-F1 of predictions ``y_pred`` against the audit's labels ``y_true``;
    None without a labelled audit.

    The macro-F1 interval is the union of a seeded percentile bootstrap (the same labels give the same interval)
    and the Wilson interval of the estimate with the audit's size as its sample size: on small audits the
    bootstrap alone is too narrow (an audit without errors gives [1, 1]), on large ones with uneven classes the
    bootstrap is the wider of the two."""
    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    n = len(y_true)
    if n == 0:
        return None
    correct = int((y_true == y_pred).sum())
    low, high = wilson(correct, n, confidence)
    t, p, k = _encode(y_true, y_pred)
    f1 = float(_macro_f1_resampled(t, p, k, np.arange(n)[None, :])[0])
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    boot = _macro_f1_resampled(t, p, k, draws)
    alpha = (1 - confidence) / 2
    f1_low, f1_high = np.quantile(boot, [alpha, 1 - alpha]) if n > 1 else (0.0, 1.0)
    score_low, score_high = wilson(f1 * n, n, confidence)
    return AuditEstimate(n, correct / n, low, high, f1, float(min(f1_low, score_low, f1)),
                         float(max(f1_high, score_high, f1)), confidence)


def _encode(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    classes = np.unique(np.asarray(y_true).astype(str))
    t = np.searchsorted(classes, np.asarray(y_true).astype(str))
    pos = np.minimum(np.searchsorted(classes, np.asarray(y_pred).astype(str)), len(classes) - 1)
    p = np.where(classes[pos] == np.asarray(y_pred).astype(str), pos, len(classes))  # unknown class: index k
    return t, p, len(classes)


def _macro_f1_resampled(t: np.ndarray, p: np.ndarray, k: int, draws: np.ndarray) -> np.ndarray:
    """Macro-F1 of every row of index draws [b, n]: per class 2tp / (2tp + fp + fn), averaged over the classes
    present among the draw's true labels."""
    b = draws.shape[0]
    rows = np.repeat(np.arange(b), draws.shape[1])
    tt, pp = t[draws].ravel(), p[draws].ravel()
    width = k + 1
    true_n = np.bincount(rows * width + tt, minlength=b * width).reshape(b, width)[:, :k]
    pred_n = np.bincount(rows * width + pp, minlength=b * width).reshape(b, width)[:, :k]
    hit = tt == pp
    tp = np.bincount(rows[hit] * width + tt[hit], minlength=b * width).reshape(b, width)[:, :k]
    present = true_n > 0
    f1 = np.divide(2 * tp, true_n + pred_n, out=np.zeros(tp.shape), where=(true_n + pred_n) > 0)
    return np.where(present, f1, 0).sum(axis=1) / np.maximum(present.sum(axis=1), 1)
