"""Read and validate the corpus: schema checks before compute, per-row rejections with a reason.

The reader is a plain function over one Parquet file (streamed by row group) so that every row carries its
file and position; that order key makes "keep the first of duplicate ids" well defined across files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from pydantic import Field

from labelnext.ops.io import input_vectors as iv
from labelnext.ops.core.columns import DOC_ID, EMBEDDING, ID_HASH, ORDER, REASON, TEXT, TEXT_TRUNCATED
from labelnext.ops.core.contract import StageContract
from labelnext.ops.core.settings import StageSettings


class InputConfig(StageSettings):
    """``input``: which corpus columns hold the id and the text, and what else to carry through."""

    id_column: str = Field(default="id", description="corpus column holding each document's id (string or integer)")
    text_column: str = Field(default="text", description="corpus column holding each document's text")
    passthrough_columns: list[str] = Field(default_factory=list, description="corpus columns copied as they are "
                                           "into selected/")
    exclude_ids: Optional[str] = Field(default=None, description="ids never to select (Parquet file or prefix, "
                                       "local or s3://), excluded before embedding")
    exclude_id_column: str = Field(default="doc_id", description="id column of the exclude_ids files")
    labels: Optional[str] = Field(default=None, description="labels returned by annotators (Parquet file or "
                                  "prefix, local or s3://): they train the task model and are never reselected")
    label_id_column: str = Field(default="doc_id", description="id column of the label files (string or integer)")
    label_column: str = Field(default="label", description="label column of the label files (string, integer or "
                              "boolean, compared as strings)")
    max_chars: int = Field(default=20_000, gt=0, description="characters kept per document before tokenisation; "
                           "bounds memory for pathological documents")
    embedding_column: Optional[str] = Field(
        default=None, description="a list-of-floats column holding each document's vector (from an earlier "
        "pipeline): the embed stage is skipped; rows with a null, non-finite, all-zero or wrongly sized vector are "
        "rejected with a reason")

REJECT_NULL = "null_text"
REJECT_EMPTY = "empty_text"
REJECT_NON_UTF8 = "non_utf8_text"
REJECT_NON_UTF8_ID = "non_utf8_id"
REJECT_NULL_ID = "null_id"
REJECT_DUPLICATE = "duplicate_id"
REJECT_EXCLUDED = "excluded_id"

# Columns produced by the reader (besides passthrough columns).
CONTRACT = StageContract("read", needs=(), adds=(DOC_ID, TEXT, ORDER, ID_HASH, REASON, TEXT_TRUNCATED))


class CorpusError(ValueError):
    """The corpus cannot be read as configured; the message names the file and column."""


_STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view())
_BINARY_TYPES = (pa.binary(), pa.large_binary(), pa.binary_view())


# Rows one read task validates at most (whole row groups, so a task may hold one larger group): a big file is
# read by several tasks in parallel.
READ_TASK_ROWS = 131_072
ROW_BITS = 40  # ORDER = file index << ROW_BITS | row within the file
ALL_GROUPS = 1 << 31


@dataclass(frozen=True)
class CorpusFile:
    index: int
    path: str
    rows: int
    group_rows: tuple[int, ...] = ()  # rows of each row group, from the footer
    vector_dim: Optional[int] = None  # the dimension a fixed-size list embedding column declares


@dataclass(frozen=True)
class ReadTask:
    """Consecutive row groups of one file: the unit of work of one read task."""

    file_index: int
    path: str
    first_group: int
    groups: int
    first_row: int  # row number of the first group's first row within the file
    rows: int


def read_tasks(files: list[CorpusFile], max_rows: int = READ_TASK_ROWS) -> list[ReadTask]:
    """Split every file into runs of whole row groups holding at most ``max_rows`` rows (at least one group)."""
    tasks = []
    for f in files:
        groups = f.group_rows or (f.rows,)
        start, first_row, rows = 0, 0, 0
        for g, n in enumerate(groups):
            if g > start and rows + n > max_rows:
                tasks.append(ReadTask(f.index, f.path, start, g - start, first_row, rows))
                start, first_row, rows = g, first_row + rows, 0
            rows += n
        tasks.append(ReadTask(f.index, f.path, start, len(groups) - start, first_row, rows))
    return tasks


def list_corpus_files(filesystem: pafs.FileSystem, path: str, display: str) -> list[str]:
    """Parquet files under a file, folder or prefix, sorted; errors name the URI."""
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.NotFound:
        # S3 prefixes are not directories; a listing tells whether objects exist below.
        selector = pafs.FileSelector(path, allow_not_found=True, recursive=True)
        infos = filesystem.get_file_info(selector)
        if not infos:
            raise CorpusError(f"corpus not found: {display}")
    else:
        infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File and not _hidden(i.path[len(path):])
    )
    if not files:
        raise CorpusError(f"corpus {display} holds no files")
    return files


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.strip("/").split("/") if part)


def inspect_files(
    filesystem: pafs.FileSystem, files: list[str], cfg: InputConfig, display_prefix: str = ""
) -> list[CorpusFile]:
    """Open every file's footer and check the id/text columns exist with string types."""
    out = []
    for idx, path in enumerate(files):
        name = display_prefix + path
        try:
            with filesystem.open_input_file(path) as fh:
                meta = pq.ParquetFile(fh)
                schema = meta.schema_arrow
                rows = meta.metadata.num_rows
                group_rows = tuple(meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups))
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorpusError(f"{name}: not a readable Parquet file ({_first_line(exc)})") from None
        for col in (cfg.id_column, cfg.text_column, *cfg.passthrough_columns, *_vector_column(cfg)):
            if col not in schema.names:
                raise CorpusError(f"{name}: missing column {col!r} (has: {', '.join(schema.names)})")
        id_type = schema.field(cfg.id_column).type
        if not (id_type in _STRING_TYPES or pa.types.is_integer(id_type)):
            raise CorpusError(f"{name}: column {cfg.id_column!r} must be string or integer, found {id_type}")
        text_type = schema.field(cfg.text_column).type
        if text_type not in _STRING_TYPES + _BINARY_TYPES:
            raise CorpusError(f"{name}: column {cfg.text_column!r} must be string, found {text_type}")
        vector_dim = None
        for col in _vector_column(cfg):
            problem = iv.type_problem(schema.field(col).type)
            if problem:
                raise CorpusError(f"{name}: column {col!r} (input.embedding_column) {problem}")
            vector_dim = iv.fixed_dimension(schema.field(col).type)
        out.append(CorpusFile(idx, path, rows, group_rows, vector_dim))
    return out


def _vector_column(cfg: InputConfig) -> tuple[str, ...]:
    return (cfg.embedding_column,) if cfg.embedding_column else ()


def vector_dimension(
    filesystem: pafs.FileSystem, files: list[CorpusFile], cfg: InputConfig, encoder_dim: Optional[int] = None,
    display_prefix: str = "",
) -> Optional[int]:
    """The dimension every row's vector must have (None without ``input.embedding_column``).

    A fixed-size list type declares it (files must agree); otherwise the first non-null vector in file order
    sets it. When the configured encoder's dimension is known and the corpus's differs, the vectors are not
    the encoder's: a one-line error before any compute, rather than every row rejected.
    """
    column = cfg.embedding_column
    if not column:
        return None
    dim, source = None, ""
    for f in files:
        name = display_prefix + f.path
        if f.vector_dim is not None and dim is not None and f.vector_dim != dim:
            raise CorpusError(f"{name}: column {column!r} holds {f.vector_dim}-d vectors, {source} holds {dim}-d")
        if f.vector_dim is not None:
            dim, source = f.vector_dim, name
    for f in files if dim is None else ():
        try:
            with filesystem.open_input_file(f.path) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=4096, columns=[column]):
                    dim = iv.first_dimension(batch.column(0))
                    if dim is not None:
                        break
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorpusError(f"{display_prefix + f.path}: failed to read ({_first_line(exc)})") from None
        if dim is not None:
            source = display_prefix + f.path
            break
    if dim is not None and encoder_dim is not None and dim != encoder_dim:
        raise CorpusError(f"{source}: column {column!r} holds {dim}-d vectors but embed.model makes "
                          f"{encoder_dim}-d ones; set embed.model to the encoder that made them")
    return dim


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def id_hash(ids: list[str]) -> np.ndarray:
    """Stable 64-bit hashes of ids (driver-side duplicate detection keeps 16 bytes per document)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest(), "little") for i in ids],
        dtype=np.uint64,
    )


def text_hash(texts: list[str]) -> list[str]:
    return [hashlib.blake2b(t.encode("utf-8"), digest_size=16).hexdigest() for t in texts]


_AS_BINARY = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary(), pa.string_view(): pa.binary_view()}


def _decode_text(column: pa.Array) -> tuple[list[Optional[str]], list[bool]]:
    """Decode a binary column row by row; rows that are not UTF-8 come back as None with a flag."""
    values: list[Optional[str]] = []
    bad: list[bool] = []
    for raw in column.to_pylist():
        if raw is None:
            values.append(None)
            bad.append(False)
            continue
        try:
            values.append(raw.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            values.append(None)
            bad.append(True)
    return values, bad


def _to_python_strings(column: pa.Array) -> tuple[list[Optional[str]], list[bool]]:
    """Python strings from a string or binary column, flagging rows that are not valid UTF-8.

    Parquet does not guarantee that a *string* column holds valid UTF-8 (writers can relabel bytes), and
    Arrow only checks on demand: validate the whole column in C first, and only when that fails fall back
    to decoding its bytes row by row so one bad row is rejected instead of failing the file.
    """
    if column.type in _AS_BINARY:
        try:
            column.validate(full=True)
            return column.to_pylist(), [False] * len(column)
        except pa.ArrowInvalid:
            column = column.view(_AS_BINARY[column.type])
    return _decode_text(column)


def _raw_id(column: pa.Array, i: int) -> str:
    """A printable stand-in for an id that is not UTF-8 (only written to rejects)."""
    raw = column.view(_AS_BINARY[column.type])[i].as_py()
    return raw.decode("utf-8", "backslashreplace")


def validate_table(
    table: pa.Table, cfg: InputConfig, file_index: int, row_offset: int, dim: Optional[int] = None
) -> pa.Table:
    """Normalise one slice of a corpus file into doc_id/text + reject_reason + order/hash keys (+ the
    corpus's vectors as unit ``embedding`` rows of ``dim`` floats with ``input.embedding_column``)."""
    n = table.num_rows
    ids_col = table.column(cfg.id_column).combine_chunks()
    if ids_col.type not in _STRING_TYPES:
        ids_col = pc.cast(ids_col, pa.string())
    ids, bad_ids = _to_python_strings(ids_col)
    if any(bad_ids):
        ids = [_raw_id(ids_col, i) if bad else doc_id for i, (doc_id, bad) in enumerate(zip(ids, bad_ids))]
    texts, non_utf8 = _to_python_strings(table.column(cfg.text_column).combine_chunks())
    vectors, vector_reasons = None, [None] * n
    if cfg.embedding_column:
        if dim is None:
            raise ValueError("input.embedding_column is set: pass the vector dimension (vector_dimension)")
        vectors, vector_reasons = iv.validate_vectors(table.column(cfg.embedding_column).combine_chunks(), dim)

    reasons: list[Optional[str]] = []
    out_text: list[Optional[str]] = []
    truncated: list[bool] = []
    for doc_id, bad_id, text, bad, vector_reason in zip(ids, bad_ids, texts, non_utf8, vector_reasons):
        reason = None
        if doc_id is None or doc_id.strip() == "":
            reason = REJECT_NULL_ID
        elif bad_id:
            reason = REJECT_NON_UTF8_ID
        elif bad:
            reason = REJECT_NON_UTF8
        elif text is None:
            reason = REJECT_NULL
        elif text.strip() == "":
            reason = REJECT_EMPTY
        elif vector_reason is not None:
            reason = vector_reason
        is_trunc = reason is None and len(text) > cfg.max_chars
        reasons.append(reason)
        truncated.append(is_trunc)
        out_text.append(text[: cfg.max_chars] if is_trunc else text)

    safe_ids = [i if i is not None else "" for i in ids]
    columns = {
        "doc_id": pa.array(ids, pa.string()),
        "text": pa.array(out_text, pa.string()),
        "text_truncated": pa.array(truncated, pa.bool_()),
        REASON: pa.array(reasons, pa.string()),
        ORDER: pa.array((np.int64(file_index) << ROW_BITS) + row_offset + np.arange(n, dtype=np.int64)),
        ID_HASH: pa.array(id_hash(safe_ids)),
    }
    if vectors is not None:
        columns[EMBEDDING] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)
    for col in cfg.passthrough_columns:
        columns[col] = table.column(col).combine_chunks()
    return pa.table(columns)


def read_file(
    filesystem: pafs.FileSystem, corpus_file: CorpusFile, cfg: InputConfig, display: str = "",
    dim: Optional[int] = None,
) -> Iterator[pa.Table]:
    """Stream one whole Parquet file by row group as validated tables."""
    task = ReadTask(corpus_file.index, corpus_file.path, 0, ALL_GROUPS, 0, corpus_file.rows)
    return read_part(filesystem, task, cfg, display, dim)


def read_part(
    filesystem: pafs.FileSystem, task: ReadTask, cfg: InputConfig, display: str = "", dim: Optional[int] = None
) -> Iterator[pa.Table]:
    """Stream a task's row groups as validated tables; row numbers count from the start of the file."""
    columns = list(dict.fromkeys([cfg.id_column, cfg.text_column, *cfg.passthrough_columns, *_vector_column(cfg)]))
    offset = task.first_row
    try:
        with filesystem.open_input_file(task.path) as fh:
            pfile = pq.ParquetFile(fh)
            for rg in range(task.first_group, min(task.first_group + task.groups, pfile.num_row_groups)):
                table = pfile.read_row_group(rg, columns=columns)
                yield validate_table(table, cfg, task.file_index, offset, dim)
                offset += table.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorpusError(f"{display or task.path}: failed to read ({_first_line(exc)})") from None


def duplicate_orders(hashes: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Order keys of rows whose id hash was already seen at a smaller order key (candidates only)."""
    if hashes.size == 0:
        return np.empty(0, dtype=np.int64)
    sort = np.lexsort((orders, hashes))
    h = hashes[sort]
    repeat = np.zeros(h.size, dtype=bool)
    repeat[1:] = h[1:] == h[:-1]
    return orders[sort][repeat]


def exact_duplicates(rows: pa.Table) -> set[int]:
    """Given every row whose id hash collides (doc_id, _order), return order keys of true duplicates."""
    first: dict[str, int] = {}
    dups: set[int] = set()
    ids = rows.column("doc_id").to_pylist()
    orders = rows.column(ORDER).to_pylist()
    for doc_id, order in sorted(zip(ids, orders), key=lambda t: t[1]):
        if doc_id in first:
            dups.add(order)
        else:
            first[doc_id] = order
    return dups


# Columns of the slim per-row keys the duplicate scan and the rejects need (no text, no vectors).
KEY_COLUMNS = (DOC_ID, ID_HASH, ORDER, REASON, TEXT_TRUNCATED)


def hash_partitions(keys: pa.Table, parts: int) -> list[pa.Table]:
    """Valid rows of a keys table split by id hash, so every copy of an id lands in the same part."""
    keys = keys.filter(pc.is_null(keys.column(REASON)))
    part = keys.column(ID_HASH).to_numpy() % np.uint64(parts)
    return [keys.filter(pa.array(part == p)) for p in range(parts)]


def in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Elementwise membership of ``values`` in a sorted array."""
    if sorted_set.size == 0:
        return np.zeros(values.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return sorted_set[pos] == values


@dataclass(frozen=True)
class DuplicateScan:
    dups: np.ndarray  # order keys of rows whose id occurred earlier in file/row order
    truncated: int  # accepted rows (duplicates aside) whose text was truncated
    excluded: int  # accepted rows (duplicates aside) whose id hash is in the exclusion set


def scan_partition(parts: list[pa.Table], excluded: np.ndarray) -> DuplicateScan:
    """Exact duplicates and counts among the valid rows of one hash partition."""
    parts = [p for p in parts if p.num_rows]
    if not parts:
        return DuplicateScan(np.empty(0, np.int64), 0, 0)
    rows = pa.concat_tables(parts)
    hashes, orders = rows.column(ID_HASH).to_numpy(), rows.column(ORDER).to_numpy()
    colliding = duplicate_orders(hashes, orders)
    dups = np.empty(0, np.int64)
    if colliding.size:
        same_hash = np.isin(hashes, hashes[np.isin(orders, colliding)])
        dups = np.array(sorted(exact_duplicates(rows.filter(pa.array(same_hash)))), dtype=np.int64)
    kept = ~np.isin(orders, dups)
    truncated = rows.column(TEXT_TRUNCATED).to_numpy(zero_copy_only=False)
    return DuplicateScan(dups, int((truncated & kept).sum()), int((in_sorted(hashes, excluded) & kept).sum()))


def merge_scans(scans: list[DuplicateScan]) -> DuplicateScan:
    dups = [s.dups for s in scans]
    return DuplicateScan(np.sort(np.concatenate(dups)) if dups else np.empty(0, np.int64),
                         sum(s.truncated for s in scans), sum(s.excluded for s in scans))
