"""The selection pipeline: read -> embed -> cluster -> candidates -> score -> select -> write.

Each stage's logic lives in ``labelnext.ops``; this module wires them with Ray Data, checks every stage's
declared columns at its boundary and records costs. The Ray plumbing between stages is in
``labelnext.pipelines.dataflow``. Stages are materialised one after another so that their wall time and
reserved resources can be priced separately.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
from ray.data import ActorPoolStrategy
from ray.data.expressions import col

from labelnext.ops import candidates as cand
from labelnext.ops import cluster as clu
from labelnext.ops import embed as emb
from labelnext.ops import read as rd
from labelnext.ops import select as sel
from labelnext.ops.columns import DOC_ID, EMBEDDING, RAND_KEY, SCORE_COLUMNS, TEXT
from labelnext.ops.contract import ContractError
from labelnext.ops.embed_cache import EmbeddingCache, add_text_hash
from labelnext.ops.instrument import BUSY_S, NODE_ID, instrumented
from labelnext.ops.storage import RunLayout, display_uri, filesystem_for
from labelnext.pipelines import dataflow as flow
from labelnext.pipelines import ledger
from labelnext.pipelines.commit import RunWriter
from labelnext.pipelines.config import RunConfig
from labelnext.pipelines.cost import CostLedger, build_report
from labelnext.pipelines.placement import Placement, faiss_use_gpu, plan_placement

log = logging.getLogger("labelnext")

# Kept importable from here: the CLI and tests start Ray the way a run does.
init_ray = flow.init_ray


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


@dataclass
class Clusters:
    assigned: Any  # Ray dataset: every accepted document with its cluster
    centroids: np.ndarray
    sizes: np.ndarray


class SelectionPipeline:
    def __init__(self, cfg: RunConfig, request: RunRequest):
        self.cfg = cfg
        self.req = request.resolved()
        self.layout = RunLayout.create(self.req.output, self.req.run_date, self.req.run_id, cfg.storage)
        self.ledger = CostLedger(cfg.cost)
        self.counts: dict[str, int] = {}
        self.nodes: set[str] = set()

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        if self.req.budget < 1:
            raise PipelineError(f"--budget must be a positive integer, got {self.req.budget}")
        writer = RunWriter(self.layout, self.cfg)
        try:
            writer.begin()
            return self._run(writer)
        finally:
            writer.close()  # gives the claim back unless another attempt holds it

    def _run(self, writer: RunWriter) -> RunResult:
        placement = self.place()
        accepted, rejected = self.read()
        embedded = self.embed(accepted, placement)
        clusters = self.cluster(embedded, placement)
        candidates = self.candidates(clusters)
        scored = self.score(candidates, placement)
        selected = self.select(scored, clusters.sizes)
        self.write(writer, selected, scored, clusters, rejected)
        return self.commit(writer, embedded)

    # -- stages -----------------------------------------------------------------------------------
    def place(self) -> Placement:
        import ray

        resources = ray.cluster_resources()
        placement = plan_placement(resources, self.cfg.resources, nodes=ray.nodes())
        placement.cluster_use_gpu = faiss_use_gpu(self.cfg.resources.cluster) or (
            self.cfg.resources.cluster.use_gpu == "auto" and resources.get("GPU", 0) > 0)
        for note in placement.notes:
            log.info("placement: %s", note)
        return placement

    def read(self):
        cfg = self.cfg.input
        fs, path = filesystem_for(self.req.corpus, self.cfg.storage)
        prefix = "s3://" if self.req.corpus.startswith("s3://") else ""
        with self.ledger.stage("read", cpus=self._total_cpus()) as st:
            files = rd.list_corpus_files(fs, path, display_uri(self.req.corpus, path))
            infos = rd.inspect_files(fs, files, cfg, prefix)
            total = sum(f.rows for f in infos)
            if total == 0:
                raise rd.CorpusError(f"corpus {display_uri(self.req.corpus, path)} is empty (0 rows in {len(files)} files)")
            marked = self._validated(fs, infos, prefix)
            # Materialised so the embed actor pool's input has no pending tasks competing for its CPUs.
            accepted = marked.filter(expr=col(rd.REASON).is_null()).materialize()
            rejected = marked.filter(expr=~col(rd.REASON).is_null()).map_batches(
                flow.reject_rows, fn_kwargs={"files": [prefix + f for f in files]}, batch_format="pyarrow"
            ).materialize()
            n_rejected = rejected.count()
            accepted, n_excluded = self._exclude(accepted, total - n_rejected)
            st.docs = total
            st.extra["excluded_docs"] = n_excluded
            st.extra["truncated_chars_docs"] = int(
                marked.filter(expr=col(rd.REASON).is_null() & col(rd.TEXT_TRUNCATED)).count())
        self._check(rd.CONTRACT, accepted, output=True)
        self.counts.update(input_docs=total, rejected_docs=n_rejected, excluded_docs=n_excluded,
                           input_files=len(files))
        log.info("read: %d docs from %d files, %d rejected, %d excluded (selected before or listed in "
                 "input.exclude_ids)", total, len(files), n_rejected, n_excluded)
        return accepted, rejected

    def embed(self, accepted, placement: Placement):
        self._check(emb.CONTRACT, accepted)
        p = placement.embed
        keep = list(dict.fromkeys([DOC_ID, TEXT, *self.cfg.input.passthrough_columns]))
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
                embedded = self._embed_pool(todo, placement, cache)
                st.docs = embedded.count()  # documents actually embedded in this run
                if n_reused:
                    embedded = embedded.union(reused).materialize()
            st.extra.update(reused=n_reused, actors=p.concurrency)
            self._record_nodes(embedded)
        self.counts["accepted_docs"] = st.docs + n_reused
        if self.counts["accepted_docs"] == 0:
            raise PipelineError("no documents left: every row was rejected or excluded (see the read stage above)")
        self._check(emb.CONTRACT, embedded, output=True)
        log.info("embed: %d docs in %.1fs, %d reused from the cache", st.docs, st.wall_s, n_reused)
        return embedded

    def cluster(self, embedded, placement: Placement) -> Clusters:
        import ray

        self._check(clu.CONTRACT, embedded)
        n = self.counts["accepted_docs"]
        k = clu.choose_k(n, self.req.budget, self.cfg.cluster)
        use_gpu = placement.cluster_use_gpu
        with self.ledger.stage("cluster", cpus=self._total_cpus(), gpus=1.0 if use_gpu else 0.0) as st:
            sample_n = clu.train_sample_size(n, k, self.cfg.cluster)
            sample = flow.training_sample(embedded, n, sample_n, k, self.cfg.cluster.seed)
            init, warm_from = self._warm_start(k, sample.shape[1]) if self.cfg.cluster.warm_start else (None, None)
            train = ray.remote(flow.train_remote).options(num_gpus=1 if use_gpu else 0, num_cpus=1)
            centroids, objective = ray.get(train.remote(sample, k, self.cfg.cluster, use_gpu, init))
            assigned = embedded.map_batches(
                clu.Assigner,
                fn_constructor_kwargs={"centroids": ray.put(centroids), "seed": self.cfg.select.seed},
                compute=ActorPoolStrategy(size=placement.embed.concurrency),
                num_cpus=1,
                batch_format="numpy",
            ).materialize()
            counts = flow.collect(assigned.map_batches(flow.block_counts, fn_kwargs={"k": k}, batch_format="pyarrow"))
            sizes = np.sum([np.asarray(c) for c in counts["counts"].to_pylist()], axis=0)
            st.docs = n
            st.extra.update(k=k, train_sample=int(len(sample)), objective=objective, faiss_gpu=use_gpu,
                            warm_start_from=warm_from)
        self._check(clu.CONTRACT, assigned, output=True)
        self.counts["clusters"] = k
        log.info("cluster: k=%d trained on %d docs, assigned %d in %.1fs", k, len(sample), n, st.wall_s)
        return Clusters(assigned, centroids, np.asarray(sizes, dtype=np.int64))

    def candidates(self, clusters: Clusters) -> pa.Table:
        self._check(cand.CONTRACT, clusters.assigned)
        plan = cand.plan_candidates(clusters.sizes, self.req.budget, self.cfg.candidates)
        partial = flow.collect(clusters.assigned.drop_columns([NODE_ID, BUSY_S]).map_batches(
            cand.block_candidates, fn_kwargs={"plan": plan}, batch_format="pyarrow"))
        table = cand.merge_candidates(partial, plan)
        if table.num_rows:
            self._check(cand.CONTRACT, table, output=True)
        log.info("candidates: %d from %d clusters (budget %d)", table.num_rows, int((clusters.sizes > 0).sum()),
                 self.req.budget)
        return table

    def score(self, candidates: pa.Table, placement: Placement) -> pa.Table:
        import ray

        p = placement.score
        if self.cfg.select.rule == "cluster_only" or candidates.num_rows == 0:
            self.counts["candidates_scored"] = 0
            return candidates
        from labelnext.ops import score as sc

        self._check(sc.CONTRACT, candidates)
        with self.ledger.stage("score", cpus=p.num_cpus * p.concurrency, gpus=p.num_gpus * p.concurrency) as st:
            ds = ray.data.from_arrow(candidates.select([DOC_ID, TEXT]))
            scored = flow.collect(sc.score_dataset(
                ds, self.cfg.score, use_gpu=p.use_gpu, concurrency=p.concurrency, num_gpus=p.num_gpus,
                num_cpus=p.num_cpus, tensor_parallel_size=p.tensor_parallel_size))
            self._check(sc.CONTRACT, scored, output=True)
            scored, repeated = exactly_once(candidates.column(DOC_ID), scored)
            st.docs = scored.num_rows
            st.tokens = int(pa.compute.sum(scored.column("n_tokens")).as_py() or 0)
            st.extra["actors"] = p.concurrency
            st.extra["repeated_rows_dropped"] = repeated
            if BUSY_S in scored.column_names:
                st.extra["busy_s"] = float(pa.compute.sum(scored.column(BUSY_S)).as_py() or 0.0)
            if NODE_ID in scored.column_names:
                self.nodes.update(scored.column(NODE_ID).to_pylist())
            st.extra["truncated_docs"] = int(pa.compute.sum(scored.column("truncated").cast(pa.int64())).as_py() or 0)
            st.extra["backend"] = sc.choose_backend(self.cfg.score.backend)
        self.counts["candidates_scored"] = st.docs
        log.info("score: %d candidates, %d tokens in %.1fs", st.docs, st.tokens, st.wall_s)
        return flow.attach_columns(candidates, scored.select([DOC_ID, *SCORE_COLUMNS]))

    def select(self, scored: pa.Table, sizes: np.ndarray) -> pa.Table:
        contract = sel.contract(self.cfg.select)
        if scored.num_rows:
            self._check(contract, scored)
        with self.ledger.stage("select", cpus=1) as st:
            selected = sel.Selector(self.cfg.select).select(scored, sizes, self.req.budget)
            st.docs = selected.num_rows
        self._check(contract, selected, output=True)
        self.counts["selected"] = selected.num_rows
        log.info("select: %d documents (rule %s)", selected.num_rows, self.cfg.select.rule)
        return selected

    def write(self, writer: RunWriter, selected: pa.Table, scored: pa.Table, clusters: Clusters, rejected) -> None:
        with self.ledger.stage("write", cpus=self._total_cpus()) as st:
            writer.write_outputs(
                selected=self._with_text(selected, scored),
                scores=scored.drop_columns([c for c in (EMBEDDING, TEXT, RAND_KEY, NODE_ID, BUSY_S)
                                            if c in scored.column_names]),
                assigned=clusters.assigned,
                rejected=rejected,
                centroids=clusters.centroids,
                sizes=clusters.sizes,
            )
            st.docs = selected.num_rows

    def commit(self, writer: RunWriter, embedded) -> RunResult:
        import ray

        report = build_report(
            self.ledger,
            budget=self.req.budget,
            accepted_docs=self.counts["accepted_docs"],
            corpus_tokens_estimate=self.estimate_corpus_tokens(embedded),
            scoring_model_params=writer.scoring_model_params(),
            hardware={"cluster_resources": {k: v for k, v in ray.cluster_resources().items()
                                            if k in ("CPU", "GPU", "memory")},
                      "nodes": sorted(self.nodes)},
        )
        report["cluster"] = {"nodes": sorted(self.nodes)}
        manifest = writer.commit(report, self.counts)
        return RunResult(run_uri=self.layout.uri(), manifest=manifest, cost_report=report)

    def estimate_corpus_tokens(self, embedded) -> float:
        n = self.counts["accepted_docs"]
        if self.cfg.select.rule == "cluster_only" or n == 0:
            return 0.0
        from labelnext.ops.score import count_tokens

        sample = embedded.select_columns([TEXT]).limit(self.cfg.cost.token_sample).take_all()
        # count_tokens and n_tokens count predicted positions: a window of max_tokens predicts max_tokens - 1.
        counts = np.minimum(count_tokens([r[TEXT] for r in sample], self.cfg.score), self.cfg.score.max_tokens - 1)
        return float(np.mean(counts) * n) if len(counts) else 0.0

    # -- helpers ----------------------------------------------------------------------------------
    def _validated(self, fs, infos: list, prefix: str):
        """Every corpus row validated, exact duplicate ids marked as rejects (first occurrence kept)."""
        import ray

        items = ray.data.from_items([{"index": f.index, "path": f.path, "rows": f.rows} for f in infos])
        validated = items.map_batches(
            flow.read_files, batch_size=1, fn_kwargs={"filesystem": fs, "cfg": self.cfg.input, "prefix": prefix},
            batch_format="numpy",
        ).materialize()
        hashes, orders = flow.valid_keys(validated)
        dup_candidates = rd.duplicate_orders(hashes, orders)
        dups = np.empty(0, np.int64)
        if dup_candidates.size:
            colliding = np.unique(hashes[np.isin(orders, dup_candidates)])
            rows = flow.collect(validated.map_batches(
                lambda t: t.filter(pa.compute.is_in(t.column(rd.ID_HASH), value_set=pa.array(colliding)))
                .select([DOC_ID, rd.ORDER, rd.REASON]), batch_format="pyarrow"))
            rows = rows.filter(pa.compute.is_null(rows.column(rd.REASON)))
            dups = np.array(sorted(rd.exact_duplicates(rows)), dtype=np.int64)
        return validated.map_batches(flow.mark_duplicates, fn_kwargs={"dups": dups}, batch_format="pyarrow").materialize()

    def _exclude(self, accepted, n_valid: int):
        """Drop ids the ledger or ``input.exclude_ids`` name; returns (accepted, number excluded)."""
        import ray

        excluded = self._exclusions()
        if not excluded.size:
            return accepted, 0
        accepted = accepted.map_batches(ledger.drop_excluded, fn_kwargs={"excluded": ray.put(excluded)},
                                        batch_format="pyarrow").materialize()
        return accepted, n_valid - accepted.count()

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

    def _embed_pool(self, todo, placement: Placement, cache: Optional[EmbeddingCache]):
        p = placement.embed
        embedded = todo.map_batches(
            instrumented(emb.Embedder),
            fn_constructor_kwargs={"cfg": self.cfg.embed, "device": "cuda" if p.use_gpu else "cpu"},
            batch_size=self.cfg.embed.batch_size * 4,
            compute=ActorPoolStrategy(size=p.concurrency),
            num_cpus=p.num_cpus,
            num_gpus=p.num_gpus if p.use_gpu else 0,
            batch_format="numpy",
        )
        if cache is not None:
            embedded = embedded.map_batches(cache.write, batch_format="numpy")
        return embedded.materialize()

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

    def _with_text(self, selected: pa.Table, scored: pa.Table) -> pa.Table:
        extra = [*self.cfg.input.passthrough_columns]
        if self.cfg.output.include_text:
            extra.insert(0, TEXT)
        extra = [c for c in extra if c in scored.column_names]
        if not extra:
            return selected
        return flow.attach_columns(selected, scored.select([DOC_ID, *extra]))

    @staticmethod
    def _check(contract, data, output: bool = False) -> None:
        try:
            (flow.check_output if output else flow.check_input)(contract, data)
        except ContractError as exc:
            raise PipelineError(str(exc)) from None

    def _record_nodes(self, ds) -> None:
        nodes = flow.collect(ds.select_columns([NODE_ID]).map_batches(flow.unique_nodes, batch_format="pyarrow"))
        if NODE_ID in nodes.column_names:  # an empty dataset (every row rejected) collects to no columns
            self.nodes.update(nodes.column(NODE_ID).to_pylist())

    @staticmethod
    def _total_cpus() -> float:
        import ray

        return float(ray.cluster_resources().get("CPU", 1.0))


def exactly_once(expected_ids: pa.ChunkedArray, scored: pa.Table) -> tuple[pa.Table, int]:
    """Scored rows, one per expected doc_id, and how many repeated rows were dropped.

    Ray retries a failed task or a lost actor's batch, so a row can come back twice; a candidate that never
    came back, or an id nobody asked for, is a pipeline error rather than a silently smaller selection.
    """
    ids = scored.column(DOC_ID).to_pylist()
    first: dict[Any, int] = {}
    for i, doc_id in enumerate(ids):
        first.setdefault(doc_id, i)
    expected = set(expected_ids.to_pylist())
    missing = expected.difference(first)
    unexpected = set(first).difference(expected)
    if missing or unexpected:
        what = (f"{len(missing)} candidates never came back (e.g. {sorted(missing, key=str)[0]!r})" if missing
                else f"{len(unexpected)} rows are not candidates (e.g. {sorted(unexpected, key=str)[0]!r})")
        raise PipelineError(f"stage score: {what}")
    repeated = len(ids) - len(first)
    if repeated:
        scored = scored.take(pa.array(sorted(first.values()), pa.int64()))
    return scored, repeated


def run_pipeline(cfg: RunConfig, request: RunRequest) -> RunResult:
    from labelnext.ops.quiet import quiet_third_party

    quiet_third_party()
    flow.init_ray(cfg)
    return SelectionPipeline(cfg, request).run()
