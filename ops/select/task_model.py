"""Task model: a linear classifier on document embeddings, trained on the labels returned so far.

It gives the task's own uncertainty (the margin between the two most probable classes) for every unlabelled
document. scikit-learn fits it on the driver (multinomial logistic regression, whose probabilities come from
a proper scoring rule); prediction is plain numpy on a few KB of weights (classes x dimension), so the assign
pass broadcasts the model to its actors like the centroids and no worker needs scikit-learn.

Everything here takes and returns numpy arrays and needs no Ray, so benchmarks call it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from labelnext.ops.core.settings import StageSettings


class TaskModelConfig(StageSettings):
    """``select.task_model``: the classifier trained on the labels (used only when labels exist)."""

    c: float = Field(default=10.0, gt=0, description="inverse L2 strength of the logistic regression")
    max_labels: int = Field(default=200_000, gt=0, description="labelled documents it trains on at most "
                            "(a seeded sample by doc_id above this)")
    cv_folds: int = Field(default=5, ge=2, description="folds of the cross-validated accuracy on the labels")
    cv_max_labels: int = Field(default=20_000, gt=0, description="labels the cross-validation uses at most")
    seed: int = Field(default=0, description="seed of the label sample and the cross-validation folds")


@dataclass(frozen=True)
class TaskModel:
    """Softmax-linear classifier: ``p = softmax(x @ coef.T + intercept)`` over ``classes`` (strings)."""

    classes: np.ndarray  # [c] str
    coef: np.ndarray  # [c, d] float32
    intercept: np.ndarray  # [c] float32

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, c: float = 10.0, max_iter: int = 2000) -> "TaskModel":
        """Fit on embeddings ``x`` [n, d] and labels ``y`` [n] (any values; kept as strings); needs two classes."""
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(y).astype(str)
        if np.unique(y).size < 2:
            raise ValueError("a task model needs labels of at least two classes")
        lr = LogisticRegression(C=c, max_iter=max_iter).fit(np.asarray(x, dtype=np.float32), y)
        coef, intercept = lr.coef_, lr.intercept_
        if coef.shape[0] == 1:  # binary: sigmoid(z) is the softmax of logits (0, z)
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.array([0.0, intercept[0]])
        return cls(np.asarray(lr.classes_).astype(str), coef.astype(np.float32), intercept.astype(np.float32))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        logits = np.asarray(x, dtype=np.float32) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes[np.argmax(self.predict_proba(x), axis=1)]

    def margin(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(margin, predicted label) per row: top-1 minus top-2 class probability; small = uncertain."""
        p = self.predict_proba(x)
        if len(p) == 0:
            return np.zeros(0, np.float32), self.classes[:0]
        return top_two_margin(p).astype(np.float32), self.classes[np.argmax(p, axis=1)]

    # -- small arrays: broadcast to actors, saved next to the run ------------------------------------
    def to_table(self) -> pa.Table:
        d = self.coef.shape[1]
        return pa.table({
            "label": pa.array(self.classes.tolist(), pa.string()),
            "intercept": pa.array(self.intercept, pa.float32()),
            "coef": pa.FixedSizeListArray.from_arrays(pa.array(self.coef.ravel(), pa.float32()), d),
        })

    @classmethod
    def from_table(cls, table: pa.Table) -> "TaskModel":
        coef = np.asarray(table.column("coef").combine_chunks().flatten(), dtype=np.float32)
        return cls(np.asarray(table.column("label").to_pylist()).astype(str),
                   coef.reshape(table.num_rows, -1), table.column("intercept").to_numpy().astype(np.float32))

    def save(self, filesystem, path: str) -> None:
        with filesystem.open_output_stream(path) as out:
            pq.write_table(self.to_table(), out)

    @classmethod
    def load(cls, filesystem, path: str) -> "TaskModel":
        with filesystem.open_input_file(path) as fh:
            return cls.from_table(pq.read_table(fh))


def top_two_margin(p: np.ndarray) -> np.ndarray:
    """Per row of class probabilities ``p`` [n, c >= 2]: the most probable class's minus the second's."""
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def cross_validated_accuracy(x: np.ndarray, y: np.ndarray, cfg: TaskModelConfig) -> tuple[Optional[float], int]:
    """(held-out accuracy, folds) by stratified k-fold on the labels; (None, 0) when a class has one label.

    Folds are capped by the smallest class, and at most ``cfg.cv_max_labels`` labels (a seeded sample) take part.
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y).astype(str)
    if len(y) > cfg.cv_max_labels:
        keep = np.random.default_rng(cfg.seed).choice(len(y), cfg.cv_max_labels, replace=False)
        x, y = x[np.sort(keep)], y[np.sort(keep)]
    _, per_class = np.unique(y, return_counts=True)
    folds = int(min(cfg.cv_folds, per_class.min())) if per_class.size >= 2 else 0
    if folds < 2:
        return None, 0
    correct = 0
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=cfg.seed).split(x, y):
        if np.unique(y[train]).size < 2:
            continue
        model = TaskModel.fit(x[train], y[train], c=cfg.c)
        correct += int((model.predict(x[test]) == y[test]).sum())
    return correct / len(y), folds


def class_balance_tilt(clusters: np.ndarray, predicted: np.ndarray, label_counts: Mapping[str, int],
                       n_clusters: int, strength: float) -> np.ndarray:
    """Per-cluster quota multiplier that favours clusters whose documents are predicted as rare classes.

    A class's rarity is (1 / K) over its smoothed share of the labels so far ((n + 1) / (N + K)), so it is 1
    when the labels are balanced; a cluster's multiplier is the mean rarity of its rows' predicted labels to
    the power ``strength`` (0: no tilt; 1: quotas weighted by full inverse class frequency).
    """
    out = np.ones(n_clusters)
    if strength <= 0 or len(clusters) == 0:
        return out
    classes = sorted(set(label_counts) | set(np.asarray(predicted).astype(str).tolist()))
    counts = np.array([label_counts.get(c, 0) for c in classes], dtype=np.float64)
    share = (counts + 1.0) / (counts.sum() + len(classes))
    rarity = (1.0 / len(classes)) / share
    index = {c: i for i, c in enumerate(classes)}
    per_row = rarity[[index[str(p)] for p in predicted]]
    clusters = np.asarray(clusters, dtype=np.int64)
    total = np.bincount(clusters, weights=per_row, minlength=n_clusters)
    rows = np.bincount(clusters, minlength=n_clusters)
    mean = np.where(rows > 0, total / np.maximum(rows, 1), 1.0)
    return mean ** strength
