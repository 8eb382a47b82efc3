"""Ray Data plumbing the selection pipeline uses between stages: file fan-out, duplicate marking, per-block
counts, small collections to the driver, the seeded k-means training sample and Ray start-up.

Nothing here knows a stage's logic; the stages live in ``labelnext.ops`` and the data flow reads top to bottom
in ``labelnext.pipelines.selection``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from labelnext.ops.io import read as rd
from labelnext.ops.cluster.kmeans import rand_keys, train_kmeans
from labelnext.ops.cluster.candidates import CandidatePlan, block_candidates, merge_candidates
from labelnext.ops.core.columns import CANDIDATE_REASON, CLUSTER_ID, DISTANCE, DOC_ID, EMBEDDING, RAND_KEY
from labelnext.ops.core.contract import StageContract
from labelnext.ops.select import audit
from labelnext.ops.core.instrument import BUSY_S, NODE_ID
from labelnext.ops.core.quiet import quiet_third_party, worker_env
from labelnext.pipelines import spill
from labelnext.pipelines.config import RunConfig
from labelnext.pipelines.ray_quiet import quiet_ray_driver
from labelnext.pipelines.telemetry import count_driver_rows


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


def _python(value):
    return value.item() if isinstance(value, np.generic) else value


def read_tasks(batch: dict[str, np.ndarray], filesystem, cfg, prefix: str, dim: Optional[int]):
    for i in range(len(batch["path"])):
        task = rd.ReadTask(**{name: _python(batch[name][i]) for name in rd.ReadTask.__dataclass_fields__})
        yield from rd.read_part(filesystem, task, cfg, prefix + task.path, dim)


def read_corpus(tasks: list, filesystem, cfg, prefix: str, dim: Optional[int]):
    """Every corpus row validated, as a lazy dataset: one Ray task per run of row groups (``rd.read_tasks``),
    so a big file is read in parallel. Each consumer reads the corpus again instead of pinning a copy."""
    import dataclasses

    import ray

    items = ray.data.from_items([dataclasses.asdict(t) for t in tasks], override_num_blocks=len(tasks))
    return items.map_batches(read_tasks, batch_size=1, batch_format="numpy",
                             fn_kwargs={"filesystem": filesystem, "cfg": cfg, "prefix": prefix, "dim": dim})


def _split_keys(keys: pa.Table, parts: int):
    split = rd.hash_partitions(keys, parts)
    return split[0] if parts == 1 else tuple(split)


def _scan_partition(excluded: np.ndarray, *parts: pa.Table) -> rd.DuplicateScan:
    return rd.scan_partition(list(parts), excluded)


def duplicate_scan(keys, excluded: np.ndarray, rows: int) -> rd.DuplicateScan:
    """Exact duplicate ids and the accepted rows' counts, as a hash shuffle of the slim keys over Ray tasks:
    the driver holds object refs, and gets back only the duplicates' order keys and two counts per part."""
    import ray

    parts = max(1, min(64, -(-rows // 500_000)))
    split = ray.remote(_split_keys).options(num_returns=parts)
    pieces = [split.remote(ref, parts) for ref in keys.to_arrow_refs()]
    if parts == 1:
        pieces = [[p] for p in pieces]
    scan = ray.remote(_scan_partition)
    excluded_ref = ray.put(excluded)
    scans = ray.get([scan.remote(excluded_ref, *[p[i] for p in pieces]) for i in range(parts)])
    merged = rd.merge_scans(scans)
    count_driver_rows(merged.dups.size + parts)
    return merged


def mark_duplicates(table: pa.Table, dups: np.ndarray) -> pa.Table:
    if dups.size == 0 or table.num_rows == 0:
        return table
    reasons = table.column(rd.REASON)
    is_dup = pa.array(np.isin(table.column(rd.ORDER).to_numpy(), dups))
    reasons = pa.compute.if_else(pa.compute.and_(is_dup, pa.compute.is_null(reasons)),
                                 pa.scalar(rd.REJECT_DUPLICATE, pa.string()), reasons)
    return table.set_column(table.schema.get_field_index(rd.REASON), rd.REASON, reasons)


def reject_rows(table: pa.Table, files: list[str]) -> pa.Table:
    orders = table.column(rd.ORDER).to_numpy()
    return pa.table({
        DOC_ID: table.column(DOC_ID),
        "reason": table.column(rd.REASON),
        "source_file": pa.array([files[int(o >> rd.ROW_BITS)] for o in orders], pa.string()),
        "row": pa.array((orders & ((1 << rd.ROW_BITS) - 1)).astype(np.int64)),
    })


def block_counts(table: pa.Table, k: int) -> pa.Table:
    counts = np.bincount(table.column(CLUSTER_ID).to_numpy().astype(np.int64), minlength=k)
    return pa.table({"counts": pa.array([counts.tolist()], pa.list_(pa.int64()))})


def unique_nodes(table: pa.Table) -> pa.Table:
    return pa.table({NODE_ID: pa.array(sorted(set(table.column(NODE_ID).to_pylist())), pa.string())})


def node_ids(ds) -> list[str]:
    """The nodes that produced ``ds``'s rows (its ``NODE_ID`` column)."""
    nodes = collect(ds.select_columns([NODE_ID]).map_batches(unique_nodes, batch_format="pyarrow"))
    # An empty dataset (every row rejected) collects to no columns.
    return nodes.column(NODE_ID).to_pylist() if NODE_ID in nodes.column_names else []


def collect(ds) -> pa.Table:
    """A dataset's rows on the driver, as one table; only for datasets sized by the budget or k.

    Every row the pipeline brings to the driver comes through here or :func:`take` and is counted in the
    cost report's ``driver.rows_collected``.
    """
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    count_driver_rows(sum(t.num_rows for t in tables))
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def _keep_ids(table: pa.Table, ids) -> pa.Table:
    if not isinstance(ids, (pa.Array, pa.ChunkedArray)):
        import ray

        ids = ray.get(ids)
    return table.filter(pa.compute.is_in(table.column(DOC_ID), value_set=ids))


def rows_for_ids(ds, ids, columns: list[str]) -> pa.Table:
    """``columns`` of the rows of ``ds`` whose doc_id is in ``ids``: a distributed filter, so only those rows
    (candidate-sized) reach the driver."""
    return collect(_with_ids(ds, ids, columns))


def _with_ids(ds, ids, columns: list[str]):
    """``ds`` filtered on the cluster to the rows whose doc_id is in ``ids`` (broadcast once), ``columns`` only."""
    import ray

    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return ds.select_columns(columns).map_batches(_keep_ids, fn_kwargs={"ids": ray.put(ids.unique())},
                                                  batch_format="pyarrow")


def take(ds, n: int) -> pa.Table:
    """The first ``n`` rows of a dataset on the driver (counted like :func:`collect`)."""
    return collect(ds.limit(n))


def as_embedded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Vectors the corpus carried, in the embed stage's output shape (a 2-d tensor, node and busy columns)."""
    import ray

    vectors = batch[EMBEDDING]
    if vectors.dtype == object:
        vectors = np.stack(vectors) if len(vectors) else np.zeros((0, 1), np.float32)
    n = len(batch[DOC_ID])
    return {DOC_ID: batch[DOC_ID], EMBEDDING: np.ascontiguousarray(vectors, dtype=np.float32),
            NODE_ID: np.full(n, ray.get_runtime_context().get_node_id(), dtype=object),
            BUSY_S: np.zeros(n, dtype=np.float64)}


_SAMPLE_SALT = 7919  # the training sample is drawn apart from the candidates' diverse share (select.seed)


@dataclass(frozen=True)
class TrainingSample:
    """The k-means training rows, left in the object store: the training task gathers them, not the driver.

    ``shape`` and ``len`` are those of the array :meth:`gather` builds inside the task.
    """

    refs: tuple  # object refs of the embedded dataset's blocks
    rows: int
    dim: int
    salt: int
    cutoff: Optional[int]  # keep rows whose seeded key is below it; None keeps every row

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.dim)

    def __len__(self) -> int:
        return self.rows

    def gather(self) -> np.ndarray:
        """The chosen rows ordered by the seeded hash of doc_id, cut to ``rows``."""
        import ray

        keys, vectors = [np.zeros(0, np.int64)], [np.zeros((0, self.dim), np.float32)]
        for table in ray.get(list(self.refs)):
            key = rand_keys([str(d) for d in table.column(DOC_ID).to_pylist()], self.salt)
            keep = key < self.cutoff if self.cutoff is not None else np.ones(len(key), dtype=bool)
            keys.append(key[keep])
            vectors.append(_vectors(table)[keep])
        return np.concatenate(vectors)[np.argsort(np.concatenate(keys), kind="stable")[:self.rows]]


def _vectors(table: pa.Table) -> np.ndarray:
    from ray.data.block import BlockAccessor

    vectors = BlockAccessor.for_block(table.select([EMBEDDING])).to_numpy(EMBEDDING)
    return np.ascontiguousarray(np.stack(vectors) if vectors.dtype == object else vectors, dtype=np.float32)


def _count_sample(table: pa.Table, seed: int, cutoff: int) -> pa.Table:
    keep = rand_keys([str(d) for d in table.column(DOC_ID).to_pylist()], seed) < cutoff
    return pa.table({"rows": pa.array([int(keep.sum())], pa.int64())})


def training_sample(embedded, n: int, sample_n: int, k: int, seed: int) -> TrainingSample:
    """k-means rows chosen and ordered by a seeded hash of doc_id, whatever the block layout.

    faiss k-means depends on the order of its training rows and Ray Data hands blocks over in completion
    order, so both the choice and the order must come from the documents themselves for a reproducible run.
    The sample (256 x k rows: about 1.5 GB at k = 4,000) never passes through the driver or a second copy in
    the object store: the training task filters the embedded blocks itself. ``embedded`` is materialised.
    """
    salt = seed + _SAMPLE_SALT
    cutoff, rows = None, n
    if sample_n < n:
        cutoff = int(min(1.0, 1.2 * sample_n / n) * 2**53)  # rand_keys are 53-bit
        counts = collect(embedded.select_columns([DOC_ID]).map_batches(
            _count_sample, fn_kwargs={"seed": salt, "cutoff": cutoff}, batch_format="pyarrow"))
        rows = int(pa.compute.sum(counts.column("rows")).as_py() or 0)
        if rows < k:
            cutoff, rows = None, n
    dim = embedded.schema().base_schema.field(EMBEDDING).type.shape[0]
    return TrainingSample(tuple(embedded.to_arrow_refs()), min(sample_n, rows), int(dim), salt, cutoff)


def train_remote(sample, k: int, cluster_cfg, use_gpu: bool, init: Optional[np.ndarray] = None):
    quiet_third_party()
    vectors = sample.gather() if isinstance(sample, TrainingSample) else sample
    return train_kmeans(vectors, k, cluster_cfg, use_gpu=use_gpu, init_centroids=init)


def attach_columns(left: pa.Table, right: pa.Table) -> pa.Table:
    """Left join on doc_id keeping left's row order (Arrow joins reject tensor columns and reorder rows)."""
    index = {doc_id: i for i, doc_id in enumerate(right.column(DOC_ID).to_pylist())}
    rows = pa.array([index.get(d) for d in left.column(DOC_ID).to_pylist()], pa.int64())
    out = left
    for name in right.column_names:
        if name != DOC_ID:
            out = out.append_column(name, right.column(name).take(rows))
    return out


def with_columns(selected: pa.Table, scored: pa.Table, texts, columns: list[str]) -> pa.Table:
    """``selected`` with ``columns`` (its text, passthrough columns): from the scored candidates when they carry
    them, else read back from the corpus (``texts``) for the selected documents alone."""
    have = [c for c in columns if c in scored.column_names]
    if have:
        selected = attach_columns(selected, scored.select([DOC_ID, *have]))
    missing = [c for c in columns if c not in have]
    if not missing or selected.num_rows == 0:
        return selected
    return attach_columns(selected, rows_for_ids(texts, selected.column(DOC_ID), [DOC_ID, *missing]))


# -- candidates: the per-cluster top-k and the join back, both distributed --------------------------------
CANDIDATE_KEYS = (DOC_ID, CLUSTER_ID, DISTANCE, RAND_KEY)
CANDIDATES_PER_PARTITION = 5_000


def per_cluster_candidates(assigned, plan: CandidatePlan, columns: list[str]) -> pa.Table:
    """The exact candidates with ``columns`` of their rows and ``candidate_reason``, sorted by cluster then doc_id.

    Runs on the cluster: each block keeps its rows that could make a cluster's quota, a groupby brings each
    cluster's survivors together and picks its candidates, and a filter over ``assigned`` fetches the picked
    rows. The picks stay in the object store, so the driver receives the candidates once, with every column.
    """
    import ray
    from ray.data.context import ShuffleStrategy

    slim = list(dict.fromkeys((*CANDIDATE_KEYS, plan.near_key)))
    partial = assigned.select_columns(slim).map_batches(
        block_candidates, fn_kwargs={"plan": plan}, batch_format="pyarrow")
    # The survivors are candidate-sized: in a few blocks, a sort-based shuffle over Ray tasks brings each
    # cluster's together. Ray's default hash shuffle starts a pool of aggregator actors per call (seconds of
    # fixed cost, sized for corpus-sized data). The survivors' dataset has its own context: nothing else changes
    # strategy.
    partitions = max(1, min(200, math.ceil(plan.total / CANDIDATES_PER_PARTITION)))
    survivors = ray.data.from_arrow_refs(partial.to_arrow_refs()).repartition(partitions)
    survivors.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    merged = survivors.groupby(CLUSTER_ID).map_groups(merge_candidates, fn_kwargs={"plan": plan},
                                                      batch_format="pyarrow")
    picks = ray.remote(_concat_picks).remote(*merged.select_columns([DOC_ID, CANDIDATE_REASON]).to_arrow_refs())
    expected = ray.get(ray.remote(_num_rows).remote(picks))
    if expected == 0:
        return pa.table({})
    wanted = list(dict.fromkeys((DOC_ID, *columns)))
    table = collect(assigned.select_columns(wanted).map_batches(
        _keep_picked, fn_kwargs={"picks": picks}, batch_format="pyarrow"))
    found = pa.compute.count_distinct(table.column(DOC_ID)).as_py() if table.num_rows else 0
    if found != expected or table.num_rows != expected:
        raise ValueError(f"{expected} candidates picked but {table.num_rows} rows ({found} distinct doc_ids) "
                         "came back when fetching their columns: doc_ids must be unique")
    return table.sort_by([(CLUSTER_ID, "ascending"), (DOC_ID, "ascending")])


def _concat_picks(*tables: pa.Table) -> pa.Table:
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({DOC_ID: pa.array([], pa.string()), CANDIDATE_REASON: pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="default").combine_chunks()


def _num_rows(table: pa.Table) -> int:
    return table.num_rows


def _keep_picked(table: pa.Table, picks) -> pa.Table:
    """The rows of ``table`` that were picked, with the reason they were picked."""
    if not isinstance(picks, pa.Table):
        import ray

        picks = ray.get(picks)
    ids = picks.column(DOC_ID)
    kept = table.filter(pa.compute.is_in(table.column(DOC_ID), value_set=ids))
    where = pa.compute.index_in(kept.column(DOC_ID), value_set=ids)
    return kept.append_column(CANDIDATE_REASON, picks.column(CANDIDATE_REASON).take(where))


def rows_dataset(ds, ids, columns: list[str], rows_per_block: int):
    """The rows of ``ds`` whose doc_id is in ``ids``, materialised on the cluster in ``rows_per_block``-row blocks
    (an actor pool hands a block to one actor: one block would keep the rest idle). Materialised first, so an
    actor pool that takes every CPU downstream cannot starve the filter's tasks."""
    kept = _with_ids(ds, ids, columns)
    return kept.repartition(max(1, math.ceil(len(ids) / max(1, int(rows_per_block))))).materialize()


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
        if cfg.ray.include_dashboard is not None:
            kwargs["include_dashboard"] = cfg.ray.include_dashboard
        kwargs.update(spill.init_kwargs(cfg.ray))
    interactive = sys.stderr.isatty()
    quiet_ray_driver(progress_bars=interactive)
    ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False
    # Start every actor of a pool before dispatching, so work spreads over the pool (and nodes) instead of
    # piling onto the first actor to load its model; a pool the cluster cannot place fails with a clear
    # timeout instead of hanging.
    ctx.wait_for_min_actors_s = 900
    # Progress bars on a terminal; elsewhere (jobs, CI, files) the per-stage log lines carry progress and
    # Ray Data's periodic progress dumps would flood the log.
    ctx.enable_progress_bars = interactive
    if not interactive:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


# -- the audit sample: a uniform draw over every assigned document, merged on the cluster ---------------------
def audit_sample(assigned, n: int, salt: bytes, columns: list[str]) -> pa.Table:
    """The ``n`` documents of ``assigned`` with the smallest audit keys (a uniform sample), ``columns`` of their
    rows, in draw order. Each block keeps its ``n`` smallest, one task merges them, and only the ``n`` rows reach
    the driver."""
    import ray

    partial = assigned.select_columns([DOC_ID]).map_batches(
        audit.block_smallest, fn_kwargs={"n": n, "salt": salt}, batch_format="pyarrow")
    drawn = ray.get(ray.remote(_smallest_of).remote(n, *partial.to_arrow_refs()))
    count_driver_rows(drawn.num_rows)
    if drawn.num_rows == 0:
        return pa.table({})
    rows = rows_for_ids(assigned, drawn.column(DOC_ID), list(dict.fromkeys((DOC_ID, *columns))))
    order = pa.compute.index_in(drawn.column(DOC_ID), value_set=rows.column(DOC_ID))
    return rows.take(order)


def _smallest_of(n: int, *tables: pa.Table) -> pa.Table:
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({DOC_ID: pa.array([], pa.string()), audit.AUDIT_KEY: pa.array([], pa.uint64())})
    return audit.smallest(pa.concat_tables(tables).combine_chunks(), n)
