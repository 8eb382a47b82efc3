"""Where runs live: URI parsing, validated run layout, Parquet/JSON writes and file listings.

Local paths and ``s3://bucket/prefix`` share one code path: pyarrow filesystems for data, an ``ObjectStore``
(boto3 on S3) for small objects that need atomic or conditional writes. Endpoint and region come from the
standard AWS settings unless ``storage.endpoint_url``/``storage.region`` override them; credentials are left
to the AWS credential chain and never pass through this module.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from labelnext.ops.io.objects import LocalObjects, ObjectStore, S3Objects, StorageError
from labelnext.ops.io.s3 import S3Settings, StorageConfig


MANIFEST = "manifest.json"  # written last; the only file readers trust
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_run_id(run_id: str) -> str:
    if not run_id or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ValueError(
            f"invalid run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return run_id


def validate_run_date(run_date: str) -> str:
    try:
        parsed = dt.date.fromisoformat(run_date)
    except (TypeError, ValueError):
        raise ValueError(f"invalid run date {run_date!r}: expected YYYY-MM-DD") from None
    if parsed.isoformat() != run_date:
        raise ValueError(f"invalid run date {run_date!r}: expected YYYY-MM-DD")
    return run_date


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_settings(cfg: StorageConfig) -> S3Settings:
    """Endpoint/region/encryption for S3 clients: config overrides, else the standard AWS environment."""
    return S3Settings.from_config(cfg)


def _local_path(uri: str) -> str:
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return str(Path(path).expanduser().resolve())


def filesystem_for(uri: str, cfg: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a local path or an s3:// URI.

    With ``storage.sse`` set, the S3 filesystem encrypts every write (see ``labelnext.ops.io.s3``); pass this same
    filesystem to Ray Data writes so that workers encrypt too.
    """
    if is_s3(uri):
        return s3_settings(cfg).filesystem(), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), _local_path(uri)


def objects_for(uri: str, cfg: StorageConfig) -> ObjectStore:
    """The small-object store (boto3 on S3) for the same location as ``filesystem_for``."""
    return S3Objects(s3_settings(cfg)) if is_s3(uri) else LocalObjects()


def display_uri(uri: str, fs_path: str) -> str:
    return f"s3://{fs_path}" if is_s3(uri) else fs_path


@dataclass(frozen=True)
class OutputRoot:
    """The output location: runs, the ledger, the embedding cache and run claims live below it."""

    uri: str
    fs: pafs.FileSystem
    root: str  # path inside fs
    objects: ObjectStore

    @classmethod
    def open(cls, uri: str, cfg: StorageConfig) -> "OutputRoot":
        fs, root = filesystem_for(uri, cfg)
        return cls(uri, fs, root, objects_for(uri, cfg))

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def display(self, path: str) -> str:
        return display_uri(self.uri, path)

    def run(self, run_date: str, run_id: str) -> "RunLayout":
        return RunLayout(self, validate_run_date(run_date), validate_run_id(run_id))


@dataclass(frozen=True)
class RunLayout:
    """The run's prefix: ``OUTPUT/run_date=YYYY-MM-DD/run_id=ID/``, built only from validated parts."""

    output: OutputRoot
    run_date: str
    run_id: str

    @classmethod
    def create(cls, output_uri: str, run_date: str, run_id: str, cfg: StorageConfig) -> "RunLayout":
        return OutputRoot.open(output_uri, cfg).run(run_date, run_id)

    @property
    def fs(self) -> pafs.FileSystem:
        return self.output.fs

    @property
    def objects(self) -> ObjectStore:
        return self.output.objects

    @property
    def label(self) -> str:
        return f"run_date={self.run_date}/run_id={self.run_id}"

    @property
    def prefix(self) -> str:
        return self.output.path(self.label)

    @property
    def claim_path(self) -> str:
        return self.output.path(f"_locks/{self.label}.json")

    def path(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def uri(self, rel: str = "") -> str:
        base = self.output.display(self.prefix)
        return f"{base}/{rel}" if rel else base

    def relative(self, path: str) -> str:
        return path[len(self.prefix) + 1:]


def write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Write one Parquet file. An S3 PUT is atomic; locally a hidden temporary file is renamed into place."""
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as out:
            pq.write_table(table, out)
        return
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as out:
            pq.write_table(table, out)
        fs.move(tmp, path)
    finally:
        if exists(fs, tmp):
            fs.delete_file(tmp)


def to_json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8")


def write_json(objects: ObjectStore, path: str, obj: Any) -> None:
    objects.put(path, to_json_bytes(obj))


def read_json(fs: pafs.FileSystem, path: str) -> Optional[Any]:
    try:
        with fs.open_input_stream(path) as fh:
            return json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        return None


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """Files below ``path``, without hidden temporaries (``.name``) that a local write may have left."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos
                  if i.type == pafs.FileType.File and not i.path.rsplit("/", 1)[-1].startswith("."))


def file_entry(fs: pafs.FileSystem, path: str, rel: str) -> dict[str, Any]:
    """Manifest entry: relative path, bytes, and rows for Parquet files (from the footer)."""
    info = fs.get_file_info(path)
    entry: dict[str, Any] = {"path": rel, "bytes": int(info.size or 0)}
    if path.endswith(".parquet"):
        with fs.open_input_file(path) as fh:
            entry["rows"] = int(pq.ParquetFile(fh).metadata.num_rows)
    return entry
