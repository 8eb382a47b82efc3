"""Labels returned by annotators: read, checked and deduplicated, and matched to embedding vectors.

``input.labels`` is a Parquet file or a prefix (local or s3://) that grows every night, with an id column
(``input.label_id_column``, string or integer) and a label column (``input.label_column``, string, integer or
boolean; labels are compared as strings). Bad rows follow the corpus' rules: they are counted, never fatal.

- A row whose id or label is null is skipped and counted (``null_labels``).
- An id labelled more than once keeps its latest label and the older rows are counted
  (``duplicate_labels``). "Latest" is the order of the files by modification time (then by path when two
  files share a time) and, within a file, the row order: a file written later overrides an earlier one.

A file that cannot be read, lacks a column or has a column of the wrong type stops the run with one error
naming the file and the column. Hidden files (``_SUCCESS``, ``.part``) are skipped; a prefix with no files
yet is a cold start, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from labelnext.ops.io import read as rd
from labelnext.ops.core.columns import DOC_ID, EMBEDDING, ID_HASH
from labelnext.ops.io.s3 import StorageConfig
from labelnext.ops.io.storage import display_uri, filesystem_for

LABEL = "label"


class LabelsError(ValueError):
    """A label file cannot be read as configured; the message names the file and the column."""


@dataclass
class LabelSet:
    """The labels so far: one (doc_id, label) per labelled document, plus what was skipped on the way."""

    doc_ids: pa.Array  # string, unique
    labels: pa.Array  # string, the latest label of each id
    files: int = 0
    rows: int = 0  # rows read, bad ones included
    null_labels: int = 0  # rows skipped: null id or null label
    duplicate_labels: int = 0  # rows superseded by a later label of the same id
    source: str = ""
    notes: list[str] = field(default_factory=list)
    _hashes: Optional[np.ndarray] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def hashes(self) -> np.ndarray:
        """Sorted id hashes (the reader's ``_id_hash``): what the run excludes and looks vectors up by."""
        if self._hashes is None:
            ids = self.doc_ids.to_pylist()
            self._hashes = np.unique(rd.id_hash(ids)) if ids else np.empty(0, np.uint64)
        return self._hashes

    def counts(self) -> dict[str, int]:
        """Labels per class, most frequent first."""
        return label_counts(self.labels)

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "files": self.files, "rows": self.rows, "labelled_docs": len(self),
                "null_labels": self.null_labels, "duplicate_labels": self.duplicate_labels,
                "label_counts": self.counts()}


def label_counts(labels: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """Rows per label (nulls left out), most frequent first, then by label."""
    labels = pc.drop_null(labels)
    if not len(labels):
        return {}
    vc = pc.value_counts(labels)
    pairs = zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())
    return dict(sorted(pairs, key=lambda kv: (-kv[1], kv[0])))


def empty_label_set(source: str = "") -> LabelSet:
    return LabelSet(pa.array([], pa.string()), pa.array([], pa.string()), source=source)


def list_label_files(filesystem: pafs.FileSystem, path: str) -> list[str]:
    """Label files under a file or prefix, oldest first (modification time, then path)."""
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    files = [i for i in infos if i.type == pafs.FileType.File and not rd._hidden(i.path[len(path):])]
    return [i.path for i in sorted(files, key=lambda i: (i.mtime_ns or 0, i.path))]


_ID_TYPES = (pa.string(), pa.large_string())


def _read_file(filesystem: pafs.FileSystem, path: str, shown: str, id_column: str, label_column: str) -> pa.Table:
    try:
        with filesystem.open_input_file(path) as fh:
            pfile = pq.ParquetFile(fh)
            schema = pfile.schema_arrow
            for column, key in ((id_column, "input.label_id_column"), (label_column, "input.label_column")):
                if column not in schema.names:
                    raise LabelsError(f"input.labels {shown}: missing column {column!r} "
                                      f"(has: {', '.join(schema.names)}); set {key}")
            id_type, label_type = schema.field(id_column).type, schema.field(label_column).type
            if not (id_type in _ID_TYPES or pa.types.is_integer(id_type)):
                raise LabelsError(f"input.labels {shown}: column {id_column!r} must be string or integer, "
                                  f"found {id_type}")
            if not (label_type in _ID_TYPES or pa.types.is_integer(label_type) or pa.types.is_boolean(label_type)):
                raise LabelsError(f"input.labels {shown}: column {label_column!r} must be string, integer or "
                                  f"boolean, found {label_type}")
            table = pfile.read(columns=[id_column, label_column])
    except (pa.ArrowInvalid, OSError) as exc:
        raise LabelsError(f"input.labels {shown}: not a readable Parquet file ({rd._first_line(exc)})") from None
    return pa.table({DOC_ID: pc.cast(table.column(id_column), pa.string()),
                     LABEL: pc.cast(table.column(label_column), pa.string())})


def read_labels(uri: str, id_column: str, label_column: str, storage: StorageConfig) -> LabelSet:
    """Every label file under ``uri``, bad rows counted, the latest label of each id kept (see the module doc)."""
    filesystem, path = filesystem_for(uri, storage)
    shown_root = display_uri(uri, path)
    prefix = "s3://" if uri.startswith("s3://") else ""
    files = list_label_files(filesystem, path)
    if not files:
        out = empty_label_set(shown_root)
        out.notes.append(f"no label files at {shown_root} yet: a cold start")
        return out
    tables = [_read_file(filesystem, f, prefix + f, id_column, label_column) for f in files]
    table = pa.concat_tables(tables)
    rows = table.num_rows
    table = table.append_column("_pos", pa.array(np.arange(rows, dtype=np.int64)))
    valid = table.filter(pc.and_(pc.is_valid(table.column(DOC_ID)), pc.is_valid(table.column(LABEL))))
    latest = valid.group_by(DOC_ID).aggregate([("_pos", "max")]).column("_pos_max")
    keep = np.sort(latest.to_numpy())
    out = table.take(pa.array(keep, pa.int64()))
    return LabelSet(out.column(DOC_ID).combine_chunks(), out.column(LABEL).combine_chunks(), files=len(files),
                    rows=rows, null_labels=rows - valid.num_rows, duplicate_labels=valid.num_rows - len(keep),
                    source=shown_root)


def keep_ids(table: pa.Table, hashes: Any) -> pa.Table:
    """Ray Data batch function: only rows whose doc_id hash is in the sorted ``hashes`` (or an object ref)."""
    if not isinstance(hashes, np.ndarray):
        import ray

        hashes = ray.get(hashes)
    if hashes.size == 0 or table.num_rows == 0:
        return table.slice(0, 0)
    ids = (table.column(ID_HASH).to_numpy() if ID_HASH in table.column_names
           else rd.id_hash(table.column(DOC_ID).to_pylist()))
    pos = np.minimum(np.searchsorted(hashes, ids), hashes.size - 1)
    return table.filter(pa.array(hashes[pos] == ids))


def match_vectors(tonight: tuple[list[str], list[str]], cached: tuple[list[str], list[str], np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Vectors of labelled documents from the embedding cache, and the ids that must be embedded tonight.

    ``tonight``: (doc_ids, text hashes) of labelled documents in tonight's corpus; a cached vector counts only
    for the same text, else the document is embedded. ``cached``: (doc_ids, text hashes, vectors) of the cache
    rows of labelled ids; a document of an earlier night takes its cached vector (the smallest text hash when
    its text changed between nights, so the choice does not depend on file order).
    """
    by_key = {key: cached[2][i] for i, key in enumerate(zip(cached[0], cached[1]))}
    out: dict[str, np.ndarray] = {}
    todo: list[str] = []
    for key in zip(*tonight):
        if key in by_key:
            out[key[0]] = by_key[key]
        else:
            todo.append(key[0])
    pending = set(todo)
    for key in sorted(by_key):
        if key[0] not in pending:
            out.setdefault(key[0], by_key[key])
    return out, todo


@dataclass
class TrainingSet:
    x: np.ndarray  # [n, d] float32
    y: np.ndarray  # [n] str
    without_embedding: int  # labelled ids with no vector in tonight's corpus or the cache
    ids: Optional[np.ndarray] = None  # [n] str: the doc_id of each row


def training_set(labels: LabelSet, vectors: dict[str, np.ndarray], max_labels: Optional[int] = None,
                 seed: int = 0) -> TrainingSet:
    """The labelled documents that have a vector, as arrays; above ``max_labels`` a seeded sample by doc_id."""
    from labelnext.ops.cluster.kmeans import rand_keys

    ids, ys = labels.doc_ids.to_pylist(), labels.labels.to_pylist()
    found = [i for i, doc_id in enumerate(ids) if doc_id in vectors]
    if max_labels is not None and len(found) > max_labels:
        keys = rand_keys([ids[i] for i in found], seed)
        found = sorted(np.asarray(found)[np.argsort(keys, kind="stable")[:max_labels]].tolist())
    dim = next(iter(vectors.values())).shape[-1] if vectors else 0
    x = np.stack([vectors[ids[i]] for i in found]).astype(np.float32) if found else np.zeros((0, dim), np.float32)
    return TrainingSet(x, np.asarray([ys[i] for i in found], dtype=str),
                       without_embedding=len(ids) - sum(1 for d in ids if d in vectors),
                       ids=np.asarray([ids[i] for i in found], dtype=str))


def collect_columns(batches, names: tuple[str, ...]) -> dict[str, list | np.ndarray]:
    """Numpy batches (a label-sized set) as lists per column; ``embedding`` as one float32 matrix."""
    out: dict[str, list] = {name: [] for name in names}
    for batch in batches:
        for name in names:
            values = batch[name]
            if name == EMBEDDING and len(values):
                out[name].append(np.stack(values) if values.dtype == object else np.asarray(values))
            elif name != EMBEDDING:
                out[name].extend(str(v) for v in values)
    if EMBEDDING in out:
        parts = out[EMBEDDING]
        out[EMBEDDING] = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)
    return out
