"""Where runs live: URI parsing, validated run layout, Parquet/JSON writes and file listings.

Local paths and ``s3://bucket/prefix`` share one code path through pyarrow filesystems. Endpoint and
region come from the standard AWS settings unless ``storage.endpoint_url``/``storage.region`` override
them; credentials are left to the AWS credential chain and never pass through this module.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from pipelines.config import StorageConfig

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI."""


def validate_run_id(run_id: str) -> str:
    if not run_id or not _RUN_ID.match(run_id) or ".." in run_id:
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


def s3_settings(cfg: StorageConfig) -> dict[str, Any]:
    """Endpoint/region for S3 clients: config overrides, else the standard AWS environment."""
    endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return {"endpoint_url": endpoint, "region": region}


def filesystem_for(uri: str, cfg: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a local path or an s3:// URI."""
    if is_s3(uri):
        settings = s3_settings(cfg)
        kwargs: dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.retries + 1)}
        if settings["endpoint_url"]:
            kwargs["endpoint_override"] = settings["endpoint_url"]
            if settings["endpoint_url"].startswith("http://"):
                kwargs["scheme"] = "http"
        if settings["region"]:
            kwargs["region"] = settings["region"]
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def display_uri(uri: str, fs_path: str) -> str:
    return f"s3://{fs_path}" if is_s3(uri) else fs_path


@dataclass(frozen=True)
class RunLayout:
    """The run's prefix: ``OUTPUT/run_date=YYYY-MM-DD/run_id=ID/``, built only from validated parts."""

    output_uri: str
    run_date: str
    run_id: str
    fs: pafs.FileSystem
    root: str  # output root inside fs

    @classmethod
    def create(cls, output_uri: str, run_date: str, run_id: str, cfg: StorageConfig) -> "RunLayout":
        fs, root = filesystem_for(output_uri, cfg)
        return cls(output_uri, validate_run_date(run_date), validate_run_id(run_id), fs, root)

    @property
    def prefix(self) -> str:
        return f"{self.root}/run_date={self.run_date}/run_id={self.run_id}"

    def path(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def uri(self, rel: str = "") -> str:
        base = display_uri(self.output_uri, self.prefix)
        return f"{base}/{rel}" if rel else base

    def relative(self, path: str) -> str:
        return path[len(self.prefix) + 1:]


def write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as out:
        pq.write_table(table, out)


def write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def read_json(fs: pafs.FileSystem, path: str) -> Optional[Any]:
    try:
        with fs.open_input_stream(path) as fh:
            return json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        return None


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete_prefix(fs: pafs.FileSystem, path: str) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif info.type == pafs.FileType.Directory or not isinstance(fs, pafs.LocalFileSystem):
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            pass


def list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def file_entry(fs: pafs.FileSystem, path: str, rel: str) -> dict[str, Any]:
    """Manifest entry: relative path, bytes, and rows for Parquet files (from the footer)."""
    info = fs.get_file_info(path)
    entry: dict[str, Any] = {"path": rel, "bytes": int(info.size or 0)}
    if path.endswith(".parquet"):
        with fs.open_input_file(path) as fh:
            entry["rows"] = int(pq.ParquetFile(fh).metadata.num_rows)
    return entry
