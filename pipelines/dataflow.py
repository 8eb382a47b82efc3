"""Ray Data plumbing the selection pipeline uses between stages: file fan-out, duplicate marking, per-block
counts, small collections to the driver, the seeded k-means training sample and Ray start-up.

Nothing here knows a stage's logic; the stages live in ``labelnext.ops`` and the data flow reads top to bottom
in ``labelnext.pipelines.selection``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from labelnext.ops import read as rd
from labelnext.ops.cluster import rand_keys, train_kmeans
from labelnext.ops.columns import CLUSTER_ID, DOC_ID, EMBEDDING
from labelnext.ops.contract import StageContract
from labelnext.ops.instrument import NODE_ID
from labelnext.ops.quiet import quiet_third_party, worker_env
from labelnext.pipelines.config import RunConfig


def columns_of(data) -> list[str]:
    """Column names of a ``pa.Table`` or a (materialised) Ray dataset."""
    if isinstance(data, pa.Table):
        return data.column_names
    schema = data.schema()
    return list(schema.names) if schema is not None else []


def check_input(contract: StageContract, data) -> None:
    contract.check_input(columns_of(data))


def check_output(contract: StageContract, data) -> None:
    contract.check_output(columns_of(data))


def read_files(batch: dict[str, np.ndarray], filesystem, cfg, prefix: str):
    for index, path, rows in zip(batch["index"], batch["path"], batch["rows"]):
        yield from rd.read_file(filesystem, rd.CorpusFile(int(index), str(path), int(rows)), cfg, prefix + str(path))


def mark_duplicates(table: pa.Table, dups: np.ndarray) -> pa.Table:
    if dups.size == 0 or table.num_rows == 0:
        return table
    orders = table.column(rd.ORDER).to_numpy()
    is_dup = np.isin(orders, dups)
    reasons = np.array(table.column(rd.REASON).to_pylist(), dtype=object)
    reasons[is_dup & (reasons == None)] = rd.REJECT_DUPLICATE  # noqa: E711 (elementwise)
    return table.set_column(table.schema.get_field_index(rd.REASON), rd.REASON, pa.array(reasons.tolist(), pa.string()))


def reject_rows(table: pa.Table, files: list[str]) -> pa.Table:
    orders = table.column(rd.ORDER).to_numpy()
    return pa.table({
        DOC_ID: table.column(DOC_ID),
        "reason": table.column(rd.REASON),
        "source_file": pa.array([files[int(o >> 40)] for o in orders], pa.string()),
        "row": pa.array((orders & ((1 << 40) - 1)).astype(np.int64)),
    })


def block_counts(table: pa.Table, k: int) -> pa.Table:
    counts = np.bincount(table.column(CLUSTER_ID).to_numpy().astype(np.int64), minlength=k)
    return pa.table({"counts": pa.array([counts.tolist()], pa.list_(pa.int64()))})


def unique_nodes(table: pa.Table) -> pa.Table:
    return pa.table({NODE_ID: pa.array(sorted(set(table.column(NODE_ID).to_pylist())), pa.string())})


def collect(ds) -> pa.Table:
    """A dataset's rows on the driver, as one table; only for datasets sized by the budget or k."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def valid_keys(validated) -> tuple[np.ndarray, np.ndarray]:
    """(id hash, order) of every valid row: two int64 per document, for the exact duplicate check."""
    hashes, orders = [], []
    for batch in validated.select_columns([rd.ID_HASH, rd.ORDER, rd.REASON]).iter_batches(batch_format="pyarrow"):
        ok = pa.compute.is_null(batch.column(rd.REASON))
        batch = batch.filter(ok)
        hashes.append(batch.column(rd.ID_HASH).to_numpy())
        orders.append(batch.column(rd.ORDER).to_numpy())
    if not hashes:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    return np.concatenate(hashes), np.concatenate(orders)


_SAMPLE_SALT = 7919  # the training sample is drawn apart from the candidates' diverse share (select.seed)


def _hash_sample(batch: dict[str, np.ndarray], seed: int, cutoff: int) -> dict[str, np.ndarray]:
    keep = rand_keys([str(d) for d in batch[DOC_ID]], seed) < cutoff
    return {name: values[keep] for name, values in batch.items()}


def training_sample(embedded, n: int, sample_n: int, k: int, seed: int) -> np.ndarray:
    """k-means rows chosen and ordered by a seeded hash of doc_id, whatever the block layout.

    faiss k-means depends on the order of its training rows and Ray Data hands blocks over in completion
    order, so both the choice and the order must come from the documents themselves for a reproducible run.
    """
    salt = seed + _SAMPLE_SALT
    source = embedded.select_columns([DOC_ID, EMBEDDING])
    if sample_n < n:
        cutoff = int(min(1.0, 1.2 * sample_n / n) * 2**53)  # rand_keys are 53-bit
        source = source.map_batches(_hash_sample, fn_kwargs={"seed": salt, "cutoff": cutoff}, batch_format="numpy")
    batches = [b for b in source.iter_batches(batch_format="numpy") if len(b[DOC_ID])]
    if sum(len(b[DOC_ID]) for b in batches) < k:
        batches = list(embedded.select_columns([DOC_ID, EMBEDDING]).iter_batches(batch_format="numpy"))
    ids = [str(d) for b in batches for d in b[DOC_ID]]
    vectors = np.concatenate([b[EMBEDDING] for b in batches])
    return vectors[np.argsort(rand_keys(ids, salt), kind="stable")[:sample_n]]


def train_remote(sample: np.ndarray, k: int, cluster_cfg, use_gpu: bool, init: Optional[np.ndarray] = None):
    quiet_third_party()
    return train_kmeans(sample, k, cluster_cfg, use_gpu=use_gpu, init_centroids=init)


def attach_columns(left: pa.Table, right: pa.Table) -> pa.Table:
    """Left join on doc_id keeping left's row order (Arrow joins reject tensor columns and reorder rows)."""
    index = {doc_id: i for i, doc_id in enumerate(right.column(DOC_ID).to_pylist())}
    rows = pa.array([index.get(d) for d in left.column(DOC_ID).to_pylist()], pa.int64())
    out = left
    for name in right.column_names:
        if name != DOC_ID:
            out = out.append_column(name, right.column(name).take(rows))
    return out


def init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "log_to_driver": cfg.ray.log_to_driver,
        "configure_logging": True,
        "logging_level": logging.WARNING,
    }
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside a Ray job or against a running cluster: the job's runtime_env already applies.
        kwargs["address"] = address
    else:
        kwargs["runtime_env"] = {"env_vars": worker_env()}
        if cfg.ray.num_cpus:
            kwargs["num_cpus"] = cfg.ray.num_cpus
    ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False
    # Start every actor of a pool before dispatching, so work spreads over the pool (and nodes) instead of
    # piling onto the first actor to load its model; a pool the cluster cannot place fails with a clear
    # timeout instead of hanging.
    ctx.wait_for_min_actors_s = 900
    # Progress bars on a terminal; elsewhere (jobs, CI, files) the per-stage log lines carry progress and
    # Ray Data's periodic progress dumps would flood the log.
    interactive = sys.stderr.isatty()
    ctx.enable_progress_bars = interactive
    if not interactive:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
