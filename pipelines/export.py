"""``labelnext export``: a committed run's selection in the import format of an annotation tool.

- ``label-studio``: a JSON list of tasks ``{"data": {"text", "doc_id"}, "meta": {labelnext fields}}``
  (Label Studio's task import format; ``meta`` is kept with the task and passed to ML backends);
- ``argilla``: a JSON list of records ``{"id", "fields": {"text"}, "metadata", "suggestions", "responses",
  "vectors"}`` as ``Dataset.records.log`` and Argilla's ``records.json`` on disk take them;
- ``jsonl``: one JSON object per selected document with every column of ``selected/``.

Rows come in rank order. Texts come from ``selected/`` when the run kept them (``output.include_text``),
otherwise from the corpus the manifest records, reading only the id and text columns and keeping the
budget's rows.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from labelnext.ops.io import storage
from labelnext.ops.core.columns import DOC_ID, TEXT
from labelnext.ops.io.read import list_corpus_files
from labelnext.ops.io.s3 import StorageConfig

FORMATS = ("label-studio", "argilla", "jsonl")
_TEXT_HINT = "rerun with --set output.include_text=true, or pass --corpus with the run's corpus"


class ExportError(ValueError):
    """The run cannot be exported as asked; the message says why and what to do."""


def load_selected(run_uri: str, cfg: Optional[StorageConfig] = None) -> tuple[dict[str, Any], pa.Table]:
    """A committed run's manifest and its ``selected/`` rows (the files the manifest lists), in rank order."""
    fs, path = storage.filesystem_for(run_uri.rstrip("/"), cfg or StorageConfig())
    manifest = storage.read_json(fs, f"{path}/{storage.MANIFEST}")
    if manifest is None:
        raise ExportError(f"{run_uri}: no {storage.MANIFEST}; the run is missing or was not committed")
    files = [e["path"] for e in manifest.get("files", []) if e["path"].startswith("selected/")]
    if not files:
        raise ExportError(f"{run_uri}: the manifest lists no selected/ files")
    tables = []
    for rel in files:
        with fs.open_input_file(f"{path}/{rel}") as fh:
            tables.append(pq.read_table(fh))
    table = pa.concat_tables(tables, promote_options="default")
    if "rank" in table.column_names:
        table = table.sort_by([("rank", "ascending")])
    return manifest, table


def with_texts(selected: pa.Table, manifest: dict[str, Any], corpus: Optional[str] = None,
               cfg: Optional[StorageConfig] = None) -> pa.Table:
    """``selected`` with a complete ``text`` column, read from the corpus when the run did not keep it."""
    if TEXT in selected.column_names and selected.column(TEXT).null_count == 0:
        return selected
    source = corpus or manifest.get("corpus")
    if not source:
        raise ExportError(f"selected/ has no text and the manifest records no corpus: {_TEXT_HINT}")
    inputs = (manifest.get("config") or {}).get("input") or {}
    texts = corpus_texts(source, selected.column(DOC_ID).to_pylist(), inputs.get("id_column", "id"),
                         inputs.get("text_column", "text"), cfg or StorageConfig())
    if TEXT in selected.column_names:
        selected = selected.drop_columns([TEXT])
    return selected.append_column(TEXT, pa.array([texts[d] for d in selected.column(DOC_ID).to_pylist()],
                                                 pa.string()))


def corpus_texts(corpus: str, ids: list[str], id_column: str, text_column: str,
                 cfg: StorageConfig) -> dict[str, str]:
    """Texts of ``ids`` from the corpus, one row group at a time; holds only the wanted rows."""
    fs, path = storage.filesystem_for(corpus, cfg)
    wanted = pa.array(sorted(set(ids)), pa.string())
    found: dict[str, str] = {}
    for file in list_corpus_files(fs, path, storage.display_uri(corpus, path)):
        with fs.open_input_file(file) as fh:
            pfile = pq.ParquetFile(fh)
            missing = [c for c in (id_column, text_column) if c not in pfile.schema_arrow.names]
            if missing:
                raise ExportError(f"{storage.display_uri(corpus, file)}: no column {missing[0]!r}")
            for group in range(pfile.num_row_groups):
                table = pfile.read_row_group(group, columns=[id_column, text_column])
                doc_ids = pc.cast(table.column(id_column), pa.string())
                hits = table.filter(pc.is_in(doc_ids, value_set=wanted))
                for doc_id, text in zip(pc.cast(hits.column(id_column), pa.string()).to_pylist(),
                                        hits.column(text_column).to_pylist()):
                    if doc_id not in found and text is not None:
                        found[doc_id] = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
                if len(found) == len(wanted):
                    return found
    absent = [d for d in wanted.to_pylist() if d not in found]
    raise ExportError(f"{len(absent)} of {len(wanted)} selected ids are not in the corpus {corpus} "
                      f"(e.g. {absent[0]!r}): {_TEXT_HINT}")


def _plain(value: Any) -> Any:
    """JSON-ready scalars: numpy types unwrapped, NaN/inf as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _rows(selected: pa.Table) -> Iterable[dict[str, Any]]:
    for row in selected.to_pylist():
        yield {k: _plain(v) for k, v in row.items()}


def _fields(row: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """labelnext's fields of a row (everything but the text), with the run that selected it."""
    out = {k: v for k, v in row.items() if k != TEXT}
    out.update(run)
    return out


def label_studio_tasks(selected: pa.Table, run: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"data": {TEXT: row[TEXT], DOC_ID: row[DOC_ID]}, "meta": _fields(row, run)} for row in _rows(selected)]


def argilla_records(selected: pa.Table, run: dict[str, Any]) -> list[dict[str, Any]]:
    # Argilla metadata values are terms, integers or floats; missing values are left out, not null.
    return [{"id": str(row[DOC_ID]), "fields": {TEXT: row[TEXT]},
             "metadata": {k: v for k, v in _fields(row, run).items() if v is not None and not isinstance(v, (list, dict))},
             "suggestions": {}, "responses": {}, "vectors": {}} for row in _rows(selected)]


def render(selected: pa.Table, fmt: str, run: dict[str, Any]) -> bytes:
    if fmt == "label-studio":
        return json.dumps(label_studio_tasks(selected, run), ensure_ascii=False, indent=1).encode("utf-8")
    if fmt == "argilla":
        return json.dumps(argilla_records(selected, run), ensure_ascii=False, indent=1).encode("utf-8")
    if fmt == "jsonl":
        return "".join(json.dumps({**row, **run}, ensure_ascii=False) + "\n" for row in _rows(selected)).encode("utf-8")
    raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def export_run(run_uri: str, fmt: str, output: str, corpus: Optional[str] = None) -> tuple[str, int]:
    """Write the run's selection to ``output`` (local path or s3://) in ``fmt``; returns (uri, rows)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    manifest, selected = load_selected(run_uri)
    run_storage = StorageConfig.model_validate((manifest.get("config") or {}).get("storage") or {})
    selected = with_texts(selected, manifest, corpus, run_storage)
    data = render(selected, fmt, {"run_id": manifest.get("run_id"), "run_date": manifest.get("run_date")})
    _, path = storage.filesystem_for(output, run_storage)
    content_type = "application/x-ndjson" if fmt == "jsonl" else "application/json"
    storage.objects_for(output, run_storage).put(path, data, content_type=content_type)
    return output, selected.num_rows
