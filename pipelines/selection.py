"""The selection pipeline: read -> embed -> cluster -> candidates -> score -> select -> write.

Each stage's logic lives in ``ops``; this module wires them with Ray Data and records costs. Stages are
materialised one after another so that their wall time and reserved resources can be priced separately.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
from ray.data import ActorPoolStrategy
from ray.data.expressions import col

from ops import candidates as cand
from ops import ledger
from ops import read as rd
from ops.cluster import (CLUSTER_ID, DISTANCE, RAND_KEY, Assigner, choose_k, rand_keys, train_kmeans,
                          train_sample_size)
from ops.cost import CostLedger, build_report
from ops.embed import EMBEDDING, Embedder
from ops.embed_cache import EmbeddingCache, add_text_hash
from ops.instrument import BUSY_S, NODE_ID, instrumented
from ops.placement import Placement, faiss_use_gpu, plan_placement
from ops.quiet import quiet_third_party, worker_env
from ops.select import Selector
from ops.storage import RunLayout, display_uri, filesystem_for
from pipelines.commit import RunWriter
from pipelines.config import RunConfig

log = logging.getLogger("labelnext")



class PipelineError(RuntimeError):
    """A run could not complete; the message is the one-line reason shown to the user."""


@dataclass(frozen=True)
class RunRequest:
    corpus: str
    output: str
    budget: int
    run_id: Optional[str] = None
    run_date: Optional[str] = None

    def resolved(self) -> "RunRequest":
        return RunRequest(
            corpus=self.corpus,
            output=self.output,
            budget=self.budget,
            run_id=self.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6],
            run_date=self.run_date or dt.date.today().isoformat(),
        )


@dataclass
class RunResult:
    run_uri: str
    manifest: dict[str, Any]
    cost_report: dict[str, Any]


def _read_files(batch: dict[str, np.ndarray], filesystem, cfg, prefix: str):
    for index, path, rows in zip(batch["index"], batch["path"], batch["rows"]):
        yield from rd.read_file(filesystem, rd.CorpusFile(int(index), str(path), int(rows)), cfg, prefix + str(path))


def _mark_duplicates(table: pa.Table, dups: np.ndarray) -> pa.Table:
    if dups.size == 0 or table.num_rows == 0:
        return table
    orders = table.column(rd.ORDER).to_numpy()
    is_dup = np.isin(orders, dups)
    reasons = np.array(table.column(rd.REASON).to_pylist(), dtype=object)
    reasons[is_dup & (reasons == None)] = rd.REJECT_DUPLICATE  # noqa: E711 (elementwise)
    return table.set_column(table.schema.get_field_index(rd.REASON), rd.REASON, pa.array(reasons.tolist(), pa.string()))


def _reject_rows(table: pa.Table, files: list[str]) -> pa.Table:
    orders = table.column(rd.ORDER).to_numpy()
    return pa.table({
        "doc_id": table.column("doc_id"),
        "reason": table.column(rd.REASON),
        "source_file": pa.array([files[int(o >> 40)] for o in orders], pa.string()),
        "row": pa.array((orders & ((1 << 40) - 1)).astype(np.int64)),
    })


def _block_counts(table: pa.Table, k: int) -> pa.Table:
    counts = np.bincount(table.column(CLUSTER_ID).to_numpy().astype(np.int64), minlength=k)
    return pa.table({"counts": pa.array([counts.tolist()], pa.list_(pa.int64()))})


def _unique_nodes(table: pa.Table) -> pa.Table:
    return pa.table({NODE_ID: pa.array(sorted(set(table.column(NODE_ID).to_pylist())), pa.string())})


def _collect(ds) -> pa.Table:
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


class SelectionPipeline:
    def __init__(self, cfg: RunConfig, request: RunRequest):
        self.cfg = cfg
        self.req = request.resolved()
        self.layout = RunLayout.create(self.req.output, self.req.run_date, self.req.run_id, cfg.storage)
        self.ledger = CostLedger(cfg.cost)
        self.counts: dict[str, int] = {}
        self.nodes: set[str] = set()

    # -- stages -----------------------------------------------------------------------------------
    def read(self):
        import ray

        cfg = self.cfg.input
        fs, path = filesystem_for(self.req.corpus, self.cfg.storage)
        prefix = "s3://" if self.req.corpus.startswith("s3://") else ""
        with self.ledger.stage("read", cpus=self._total_cpus()) as st:
            files = rd.list_corpus_files(fs, path, display_uri(self.req.corpus, path))
            infos = rd.inspect_files(fs, files, cfg, prefix)
            total = sum(f.rows for f in infos)
            if total == 0:
                raise rd.CorpusError(f"corpus {display_uri(self.req.corpus, path)} is empty (0 rows in {len(files)} files)")
            items = ray.data.from_items([{"index": f.index, "path": f.path, "rows": f.rows} for f in infos])
            validated = items.map_batches(
                _read_files, batch_size=1, fn_kwargs={"filesystem": fs, "cfg": cfg, "prefix": prefix},
                batch_format="numpy",
            ).materialize()
            valid_keys = self._valid_keys(validated)
            dup_candidates = rd.duplicate_orders(valid_keys[0], valid_keys[1])
            dups = np.empty(0, np.int64)
            if dup_candidates.size:
                colliding_hashes = np.unique(valid_keys[0][np.isin(valid_keys[1], dup_candidates)])
                rows = _collect(validated.map_batches(
                    lambda t: t.filter(pa.compute.is_in(t.column(rd.ID_HASH), value_set=pa.array(colliding_hashes)))
                    .select(["doc_id", rd.ORDER, rd.REASON]), batch_format="pyarrow"))
                rows = rows.filter(pa.compute.is_null(rows.column(rd.REASON)))
                dups = np.array(sorted(rd.exact_duplicates(rows)), dtype=np.int64)
            marked = validated.map_batches(_mark_duplicates, fn_kwargs={"dups": dups}, batch_format="pyarrow").materialize()
            # Materialised so the embed actor pool's input has no pending tasks competing for its CPUs.
            accepted = marked.filter(expr=col(rd.REASON).is_null()).materialize()
            rejected = marked.filter(expr=~col(rd.REASON).is_null()).map_batches(
                _reject_rows, fn_kwargs={"files": [prefix + f for f in files]}, batch_format="pyarrow"
            ).materialize()
            n_rejected = rejected.count()
            excluded = self._exclusions()
            n_excluded = 0
            if excluded.size:
                accepted = accepted.map_batches(ledger.drop_excluded, fn_kwargs={"excluded": ray.put(excluded)},
                                                batch_format="pyarrow").materialize()
                n_excluded = total - n_rejected - accepted.count()
            st.docs = total
            st.extra["excluded_docs"] = n_excluded
            st.extra["truncated_chars_docs"] = int(
                marked.filter(expr=col(rd.REASON).is_null() & col("text_truncated")).count()
            )
        self.counts.update(input_docs=total, rejected_docs=n_rejected, excluded_docs=n_excluded,
                           input_files=len(files))
        log.info("read: %d docs from %d files, %d rejected, %d excluded (selected before or listed in "
                 "input.exclude_ids)", total, len(files), n_rejected, n_excluded)
        return accepted, rejected

    def _exclusions(self) -> np.ndarray:
        """Sorted id hashes to leave out: the ledger of committed runs and ``input.exclude_ids``."""
        parts = []
        if self.cfg.output.ledger:
            hashes, runs = ledger.ledger_hashes(self.layout.output, ledger.RunRef(self.req.run_date, self.req.run_id))
            log.info("ledger: %d ids selected by %d committed runs", hashes.size, len(runs))
            parts.append(hashes)
        if self.cfg.input.exclude_ids:
            hashes = ledger.user_hashes(self.cfg.input.exclude_ids, self.cfg.input.exclude_id_column, self.cfg.storage)
            log.info("input.exclude_ids: %d ids", hashes.size)
            parts.append(hashes)
        return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)

    @staticmethod
    def _valid_keys(validated) -> tuple[np.ndarray, np.ndarray]:
        hashes, orders = [], []
        for batch in validated.select_columns([rd.ID_HASH, rd.ORDER, rd.REASON]).iter_batches(batch_format="pyarrow"):
            ok = pa.compute.is_null(batch.column(rd.REASON))
            batch = batch.filter(ok)
            hashes.append(batch.column(rd.ID_HASH).to_numpy())
            orders.append(batch.column(rd.ORDER).to_numpy())
        if not hashes:
            return np.empty(0, np.uint64), np.empty(0, np.int64)
        return np.concatenate(hashes), np.concatenate(orders)

    def embed(self, accepted, placement: Placement):
        p = placement.embed
        keep = list(dict.fromkeys(["doc_id", "text", *self.cfg.input.passthrough_columns]))
        cache = EmbeddingCache(self.layout.output, self.cfg.embed) if self.cfg.embed.cache else None
        with self.ledger.stage("embed", cpus=p.num_cpus * p.concurrency, gpus=p.num_gpus * p.concurrency) as st:
            todo, reused = accepted.select_columns(keep), None
            if cache is not None:
                todo = todo.map_batches(add_text_hash, batch_format="pyarrow")
                todo, reused = cache.split(todo, keep, self.counts["input_docs"])
            n_reused = reused.count() if reused is not None else 0
            if reused is not None and todo.count() == 0:
                embedded, st.docs = reused, 0  # everything came from the cache: no encoder to start
            else:
                device = "cuda" if p.use_gpu else "cpu"
                embedded = todo.map_batches(
                    instrumented(Embedder),
                    fn_constructor_kwargs={"cfg": self.cfg.embed.model_copy(update={"device": device})},
                    batch_size=self.cfg.embed.batch_size * 4,
                    compute=ActorPoolStrategy(size=p.concurrency),
                    num_cpus=p.num_cpus,
                    num_gpus=p.num_gpus if p.use_gpu else 0,
                    batch_format="numpy",
                )
                if cache is not None:
                    embedded = embedded.map_batches(cache.write, batch_format="numpy")
                embedded = embedded.materialize()
                st.docs = embedded.count()  # documents actually embedded in this run
                if n_reused:
                    embedded = embedded.union(reused).materialize()
            st.extra.update(reused=n_reused, actors=p.concurrency)
            self._record_nodes(embedded)
        self.counts["accepted_docs"] = st.docs + n_reused
        log.info("embed: %d docs in %.1fs, %d reused from the cache", st.docs, st.wall_s, n_reused)
        return embedded

    def cluster(self, embedded, placement: Placement):
        import ray

        n = self.counts["accepted_docs"]
        k = choose_k(n, self.req.budget, self.cfg.cluster)
        use_gpu = placement.cluster_use_gpu
        with self.ledger.stage("cluster", cpus=self._total_cpus(), gpus=1.0 if use_gpu else 0.0) as st:
            sample_n = train_sample_size(n, k, self.cfg.cluster)
            sample = _training_sample(embedded, n, sample_n, k, self.cfg.cluster.seed)
            init, warm_from = self._warm_start(k, sample.shape[1]) if self.cfg.cluster.warm_start else (None, None)
            train = ray.remote(_train_remote).options(num_gpus=1 if use_gpu else 0, num_cpus=1)
            centroids, objective = ray.get(train.remote(sample, k, self.cfg.cluster, use_gpu, init))
            centroids_ref = ray.put(centroids)
            assigned = embedded.map_batches(
                Assigner,
                fn_constructor_kwargs={"centroids": centroids_ref, "seed": self.cfg.select.seed},
                compute=ActorPoolStrategy(size=placement.embed.concurrency),
                num_cpus=1,
                batch_format="numpy",
            ).materialize()
            sizes = np.sum(
                [np.asarray(c) for c in _collect(assigned.map_batches(_block_counts, fn_kwargs={"k": k},
                                                                      batch_format="pyarrow"))["counts"].to_pylist()],
                axis=0,
            )
            st.docs = n
            st.extra.update(k=k, train_sample=int(len(sample)), objective=objective, faiss_gpu=use_gpu,
                            warm_start_from=warm_from)
        self.counts["clusters"] = k
        log.info("cluster: k=%d trained on %d docs, assigned %d in %.1fs", k, len(sample), n, st.wall_s)
        return assigned, centroids, np.asarray(sizes, dtype=np.int64)

    def _warm_start(self, k: int, dim: int) -> tuple[Optional[np.ndarray], Optional[str]]:
        """The previous committed run's centroids when its k and dimension match this run's."""
        output = self.layout.output
        prev = ledger.previous_run(output, ledger.RunRef(self.req.run_date, self.req.run_id))
        centroids = ledger.load_centroids(output, prev) if prev else None
        if prev is None or centroids is None:
            log.info("cluster: no previous committed run to warm-start from")
            return None, None
        if centroids.shape != (k, dim):
            log.info("cluster: not warm-starting from %s: its centroids are %s, this run needs (%d, %d)",
                     prev.label, centroids.shape, k, dim)
            return None, None
        log.info("cluster: warm start from %s", prev.label)
        return centroids, prev.label

    def candidates(self, assigned, sizes: np.ndarray) -> pa.Table:
        plan = cand.plan_candidates(sizes, self.req.budget, self.cfg.candidates)
        partial = _collect(assigned.drop_columns([NODE_ID, BUSY_S]).map_batches(
            cand.block_candidates, fn_kwargs={"plan": plan}, batch_format="pyarrow"))
        table = cand.merge_candidates(partial, plan)
        log.info("candidates: %d from %d clusters (budget %d)", table.num_rows, int((sizes > 0).sum()), self.req.budget)
        return table

    def score(self, candidates: pa.Table, placement: Placement) -> pa.Table:
        import ray

        p = placement.score
        if self.cfg.select.rule == "cluster_only" or candidates.num_rows == 0:
            self.counts["candidates_scored"] = 0
            return candidates
        from ops.score import SCORE_COLUMNS, choose_backend, score_dataset

        with self.ledger.stage("score", cpus=p.num_cpus * p.concurrency, gpus=p.num_gpus * p.concurrency) as st:
            ds = ray.data.from_arrow(candidates.select(["doc_id", "text"]))
            scored = _collect(score_dataset(ds, self.cfg.score, use_gpu=p.use_gpu, concurrency=p.concurrency,
                                            num_gpus=p.num_gpus, num_cpus=p.num_cpus))
            st.docs = scored.num_rows
            st.tokens = int(pa.compute.sum(scored.column("n_tokens")).as_py() or 0)
            st.extra["actors"] = p.concurrency
            if BUSY_S in scored.column_names:
                st.extra["busy_s"] = float(pa.compute.sum(scored.column(BUSY_S)).as_py() or 0.0)
            if NODE_ID in scored.column_names:
                self.nodes.update(scored.column(NODE_ID).to_pylist())
            st.extra["truncated_docs"] = int(pa.compute.sum(scored.column("truncated").cast(pa.int64())).as_py() or 0)
            st.extra["backend"] = choose_backend(self.cfg.score.backend)
        self.counts["candidates_scored"] = st.docs
        log.info("score: %d candidates, %d tokens in %.1fs", st.docs, st.tokens, st.wall_s)
        return attach_scores(candidates, scored.select(["doc_id", *SCORE_COLUMNS]))

    def estimate_corpus_tokens(self, embedded) -> float:
        n = self.counts["accepted_docs"]
        if self.cfg.select.rule == "cluster_only" or n == 0:
            return 0.0
        from ops.score import count_tokens

        sample = embedded.select_columns(["text"]).limit(self.cfg.cost.token_sample).take_all()
        # count_tokens and n_tokens count predicted positions: a window of max_tokens predicts max_tokens - 1.
        counts = np.minimum(count_tokens([r["text"] for r in sample], self.cfg.score), self.cfg.score.max_tokens - 1)
        return float(np.mean(counts) * n) if len(counts) else 0.0

    # -- helpers ----------------------------------------------------------------------------------
    def _record_nodes(self, ds) -> None:
        nodes = _collect(ds.select_columns([NODE_ID]).map_batches(_unique_nodes, batch_format="pyarrow"))
        if NODE_ID in nodes.column_names:  # an empty dataset (every row rejected) collects to no columns
            self.nodes.update(nodes.column(NODE_ID).to_pylist())

    @staticmethod
    def _total_cpus() -> float:
        import ray

        return float(ray.cluster_resources().get("CPU", 1.0))

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        req = self.req
        if req.budget < 1:
            raise PipelineError(f"--budget must be a positive integer, got {req.budget}")
        writer = RunWriter(self.layout, self.cfg)
        try:
            writer.begin()
            return self._run(writer)
        finally:
            writer.close()  # gives the claim back unless another attempt holds it

    def _run(self, writer: RunWriter) -> RunResult:
        import ray

        req, layout = self.req, self.layout
        placement = plan_placement(ray.cluster_resources(), self.cfg.embed, self.cfg.score, nodes=ray.nodes())
        placement.cluster_use_gpu = faiss_use_gpu(self.cfg.cluster) or (
            self.cfg.cluster.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        for note in placement.notes:
            log.info("placement: %s", note)

        accepted, rejected = self.read()
        embedded = self.embed(accepted, placement)
        if self.counts["accepted_docs"] == 0:
            raise PipelineError("no documents left: every row was rejected or excluded (see the read stage above)")
        assigned, centroids, sizes = self.cluster(embedded, placement)
        candidates = self.candidates(assigned, sizes)
        scored = self.score(candidates, placement)
        corpus_tokens = self.estimate_corpus_tokens(embedded)

        with self.ledger.stage("select", cpus=1) as st:
            selected = Selector(self.cfg.select).select(scored, sizes, req.budget)
            st.docs = selected.num_rows
        self.counts["selected"] = selected.num_rows
        log.info("select: %d documents (rule %s)", selected.num_rows, self.cfg.select.rule)

        with self.ledger.stage("write", cpus=self._total_cpus()) as st:
            writer.write_outputs(
                selected=self._with_text(selected, scored),
                scores=scored.drop_columns([c for c in (EMBEDDING, "text", RAND_KEY, NODE_ID, BUSY_S)
                                             if c in scored.column_names]),
                assigned=assigned,
                rejected=rejected,
                centroids=centroids,
                sizes=sizes,
            )
            st.docs = selected.num_rows
        report = build_report(
            self.ledger,
            budget=req.budget,
            accepted_docs=self.counts["accepted_docs"],
            corpus_tokens_estimate=corpus_tokens,
            scoring_model_params=writer.scoring_model_params(),
            hardware={"cluster_resources": {k: v for k, v in ray.cluster_resources().items()
                                            if k in ("CPU", "GPU", "memory")},
                      "nodes": sorted(self.nodes)},
        )
        report["cluster"] = {"nodes": sorted(self.nodes)}
        manifest = writer.commit(report, self.counts)
        return RunResult(run_uri=layout.uri(), manifest=manifest, cost_report=report)

    def _with_text(self, selected: pa.Table, scored: pa.Table) -> pa.Table:
        extra = [*self.cfg.input.passthrough_columns]
        if self.cfg.output.include_text:
            extra.insert(0, "text")
        extra = [c for c in extra if c in scored.column_names]
        if not extra:
            return selected
        return attach_scores(selected, scored.select(["doc_id", *extra]))


def attach_scores(left: pa.Table, right: pa.Table) -> pa.Table:
    """Left join on doc_id keeping left's row order (Arrow joins reject tensor columns and reorder rows)."""
    index = {doc_id: i for i, doc_id in enumerate(right.column("doc_id").to_pylist())}
    rows = pa.array([index.get(d) for d in left.column("doc_id").to_pylist()], pa.int64())
    out = left
    for name in right.column_names:
        if name != "doc_id":
            out = out.append_column(name, right.column(name).take(rows))
    return out


_SAMPLE_SALT = 7919  # the training sample is drawn apart from the candidates' diverse share (select.seed)


def _hash_sample(batch: dict[str, np.ndarray], seed: int, cutoff: int) -> dict[str, np.ndarray]:
    keep = rand_keys([str(d) for d in batch["doc_id"]], seed) < cutoff
    return {name: values[keep] for name, values in batch.items()}


def _training_sample(embedded, n: int, sample_n: int, k: int, seed: int) -> np.ndarray:
    """k-means rows chosen and ordered by a seeded hash of doc_id, whatever the block layout.

    faiss k-means depends on the order of its training rows and Ray Data hands blocks over in completion
    order, so both the choice and the order must come from the documents themselves for a reproducible run.
    """
    salt = seed + _SAMPLE_SALT
    source = embedded.select_columns(["doc_id", EMBEDDING])
    if sample_n < n:
        cutoff = int(min(1.0, 1.2 * sample_n / n) * 2**53)  # rand_keys are 53-bit
        source = source.map_batches(_hash_sample, fn_kwargs={"seed": salt, "cutoff": cutoff}, batch_format="numpy")
    batches = [b for b in source.iter_batches(batch_format="numpy") if len(b["doc_id"])]
    if sum(len(b["doc_id"]) for b in batches) < k:
        batches = list(embedded.select_columns(["doc_id", EMBEDDING]).iter_batches(batch_format="numpy"))
    ids = [str(d) for b in batches for d in b["doc_id"]]
    vectors = np.concatenate([b[EMBEDDING] for b in batches])
    return vectors[np.argsort(rand_keys(ids, salt), kind="stable")[:sample_n]]


def _train_remote(sample: np.ndarray, k: int, cluster_cfg, use_gpu: bool, init: Optional[np.ndarray] = None):
    quiet_third_party()
    return train_kmeans(sample, k, cluster_cfg, use_gpu=use_gpu, init_centroids=init)


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


def run_pipeline(cfg: RunConfig, request: RunRequest) -> RunResult:
    quiet_third_party()
    init_ray(cfg)
    return SelectionPipeline(cfg, request).run()
