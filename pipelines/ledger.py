"""What earlier committed runs did: the selection ledger, exclusions and the previous run's centroids.

Every run writes its selected doc_ids to ``OUTPUT/ledger/run_date=D/run_id=ID/part-<attempt>.parquet``
before its manifest, which names that file. An entry counts only when the run's manifest exists and names
it, so a run that died before committing excludes nothing, an attempt that lost its claim cannot replace
the committed attempt's entry, and a rerun of the same run id never excludes its own earlier selection.
A run excludes only what runs dated *before* it selected: rerunning (backfilling) night N after night N+1
reproduces night N's selection.

Exclusions travel as sorted 64-bit id hashes (``labelnext.ops.io.read.id_hash``, the reader's ``_id_hash`` column):
8 bytes per excluded id on the driver and in the object store (7M ids ~ 56 MB); the chance that a new
document is dropped by a hash collision is about (excluded x corpus) / 2^64, ~4e-6 at 7M x 10M.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from labelnext.ops.io import read as rd
from labelnext.ops.io import storage
from labelnext.ops.io.storage import OutputRoot, RunLayout
from labelnext.pipelines.config import StorageConfig

log = logging.getLogger("labelnext")

LEDGER_DIR = "ledger"
_LABEL = re.compile(r"run_date=(\d{4}-\d{2}-\d{2})/run_id=([A-Za-z0-9._-]+)")


class ExclusionError(ValueError):
    """The user-given exclusion list cannot be read as configured."""


@dataclass(frozen=True, order=True)
class RunRef:
    run_date: str
    run_id: str

    @property
    def label(self) -> str:
        return f"run_date={self.run_date}/run_id={self.run_id}"


def entry_dir(layout: RunLayout) -> str:
    return layout.output.path(f"{LEDGER_DIR}/{layout.label}")


LEDGER_COLUMNS = ("doc_id", "rule", "predicted_label")  # the rule and the task model's prediction: the history


def write_entry(layout: RunLayout, selected: pa.Table, attempt: str) -> dict[str, Any]:
    """Write this attempt's selected ids, each with the rule that picked it and the task model's prediction;
    returns the manifest entry (path relative to the output root)."""
    path = f"{entry_dir(layout)}/part-{attempt}.parquet"
    n = selected.num_rows
    columns = {name: (selected.column(name).cast(pa.string()) if name in selected.column_names
                      else pa.nulls(n, pa.string())) for name in LEDGER_COLUMNS}
    storage.write_parquet(layout.fs, path, pa.table(columns))
    return storage.file_entry(layout.fs, path, path[len(layout.output.root) + 1:])


def delete_entry(layout: RunLayout) -> None:
    layout.objects.delete_prefix(entry_dir(layout))


def manifests(output: OutputRoot, refs: list[RunRef]) -> list[Optional[dict[str, Any]]]:
    """Each run's manifest, or None where the run is not committed (fetched in parallel)."""
    paths = [output.path(f"{ref.label}/{storage.MANIFEST}") for ref in refs]
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        return list(pool.map(lambda p: storage.read_json(output.fs, p), paths))


def ledger_files(output: OutputRoot) -> dict[RunRef, list[str]]:
    out: dict[RunRef, list[str]] = {}
    for path in storage.list_files(output.fs, output.path(LEDGER_DIR)):
        match = _LABEL.search(path[len(output.root):])
        if match and path.endswith(".parquet"):
            out.setdefault(RunRef(match.group(1), match.group(2)), []).append(path)
    return out


def ledger_hashes(output: OutputRoot, current: RunRef) -> tuple[np.ndarray, list[RunRef]]:
    """Id hashes selected by committed runs dated before ``current``, and which runs they came from."""
    by_run = ledger_files(output)
    refs = sorted(ref for ref in by_run if ref.run_date < current.run_date)
    committed, files = [], []
    for ref, manifest in zip(refs, manifests(output, refs)):
        entry = (manifest or {}).get("ledger") or {}
        path = output.path(entry["path"]) if entry.get("path") else None
        if path in by_run[ref]:
            committed.append(ref)
            files.append(path)
    tables, unreadable = [], []
    for ref, path in zip(list(committed), files):
        try:
            with output.fs.open_input_file(path) as fh:
                tables.append(pq.read_table(fh, columns=["doc_id"]))
        except (OSError, pa.ArrowInvalid, KeyError) as exc:
            unreadable.append(f"{ref.label} ({str(exc).splitlines()[0][:120]})")
            committed.remove(ref)
    if unreadable:
        log.warning("ledger: %d committed night(s) with an unreadable ledger file exclude nothing: %s",
                    len(unreadable), "; ".join(unreadable[:3]))
    if not tables:
        return np.empty(0, np.uint64), committed
    return _hashes(pa.concat_tables(tables).column("doc_id")), committed


def user_hashes(uri: str, column: str, cfg: StorageConfig) -> np.ndarray:
    """Id hashes from a user-given Parquet file or prefix (``input.exclude_ids``/``input.exclude_id_column``)."""
    fs, path = storage.filesystem_for(uri, cfg)
    shown = storage.display_uri(uri, path)
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
    except (FileNotFoundError, pa.ArrowInvalid, OSError) as exc:
        raise ExclusionError(f"input.exclude_ids {shown}: cannot read ({str(exc).splitlines()[0]})") from None
    if column not in dataset.schema.names:
        raise ExclusionError(f"input.exclude_ids {shown}: missing column {column!r} "
                             f"(has: {', '.join(dataset.schema.names)}); set input.exclude_id_column")
    kind = dataset.schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)):
        raise ExclusionError(f"input.exclude_ids {shown}: column {column!r} must be string or integer, found {kind}")
    return _hashes(dataset.to_table(columns=[column]).column(column))


def _hashes(ids: pa.ChunkedArray) -> np.ndarray:
    if not pa.types.is_string(ids.type):
        ids = pc.cast(ids, pa.string())  # integer ids compare as the reader casts them
    values = [v for v in ids.to_pylist() if v is not None]
    return np.unique(rd.id_hash(values)) if values else np.empty(0, np.uint64)


def drop_excluded(table: pa.Table, excluded: Any) -> pa.Table:
    """Ray Data batch function: drop rows whose ``_id_hash`` is in the sorted ``excluded`` hashes."""
    if not isinstance(excluded, np.ndarray):
        import ray

        excluded = ray.get(excluded)
    if excluded.size == 0 or table.num_rows == 0:
        return table
    hashes = table.column(rd.ID_HASH).to_numpy()
    pos = np.minimum(np.searchsorted(excluded, hashes), excluded.size - 1)
    return table.filter(pa.array(excluded[pos] != hashes))


def committed_runs(output: OutputRoot) -> list[RunRef]:
    """Runs under the output root whose manifest exists (one listing per run date)."""
    refs = []
    for date_dir in _subdirs(output.fs, output.root, "run_date="):
        for run_dir in _subdirs(output.fs, date_dir, "run_id="):
            match = _LABEL.search(run_dir[len(output.root):])
            if match:
                refs.append(RunRef(match.group(1), match.group(2)))
    return [ref for ref, manifest in zip(refs, manifests(output, refs)) if manifest is not None]


def _subdirs(fs: pafs.FileSystem, path: str, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.path for i in infos
                  if i.type == pafs.FileType.Directory and i.path.rsplit("/", 1)[-1].startswith(prefix))


def previous_run(output: OutputRoot, current: RunRef) -> Optional[RunRef]:
    """The latest committed run before ``current``: latest run date, then latest commit time."""
    earlier = [ref for ref in committed_runs(output) if ref != current and ref.run_date <= current.run_date]
    if not earlier:
        return None
    last_date = max(ref.run_date for ref in earlier)
    same_day = [ref for ref in earlier if ref.run_date == last_date]

    def committed_at(ref: RunRef) -> str:
        manifest = storage.read_json(output.fs, output.path(f"{ref.label}/{storage.MANIFEST}")) or {}
        return str(manifest.get("committed_at", ""))

    return max(same_day, key=lambda ref: (committed_at(ref), ref.run_id))


def load_centroids(output: OutputRoot, ref: RunRef) -> Optional[np.ndarray]:
    path = output.path(f"{ref.label}/centroids.parquet")
    try:
        with output.fs.open_input_file(path) as fh:
            column = pq.read_table(fh, columns=["centroid"]).column("centroid")
    except (FileNotFoundError, pa.ArrowInvalid, OSError, KeyError) as exc:
        log.warning("warm start: cannot read %s (%s)", output.display(path), exc)
        return None
    if len(column) == 0:
        return None
    return np.asarray(column.to_pylist(), dtype=np.float32)
