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

from labelnext.ops.cluster import candidates as cand
from labelnext.ops.cluster import kmeans as clu
from labelnext.ops.embed import encoder as emb
from labelnext.ops.io import input_vectors as iv
from labelnext.ops.io import read as rd
from labelnext.ops.select import selector as sel
from labelnext.ops.core.columns import DISTANCE, DOC_ID, EMBEDDING, MARGIN, RAND_KEY, TEXT
from labelnext.ops.core.contract import ContractError
from labelnext.ops.embed.cache import EmbeddingCache, add_text_hash
from labelnext.ops.core.instrument import ACTOR_ID, BUSY_S, NODE_ID
from labelnext.ops.io.storage import RunLayout, display_uri, filesystem_for
from labelnext.ops.select.task_model import TaskModel
from labelnext.pipelines import dataflow as flow
from labelnext.pipelines import ledger, paths, spill
from labelnext.pipelines import read_stage as rs
from labelnext.pipelines.commit import RunWriter
from labelnext.pipelines.config import RunConfig
from labelnext.pipelines.cost import CostLedger, build_report, sample_texts
from labelnext.pipelines import cluster_stage as cs
from labelnext.pipelines.embed_stage import embed_pool, given_vectors
from labelnext.pipelines.label_loop import LabelLoop, selection_rule
from labelnext.pipelines.placement import Placement, plan_placement
from labelnext.pipelines.telemetry import DriverTelemetry

log = logging.getLogger("labelnext")

# Kept importable from here: the CLI and tests start Ray the way a run does.
init_ray = flow.init_ray


# What the embedded dataset carries from the embed stage on: no text (it is re-read for the candidates only).
EMBEDDED_COLUMNS = (DOC_ID, EMBEDDING, NODE_ID, BUSY_S)


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

    def ref(self) -> ledger.RunRef:
        return ledger.RunRef(self.run_date, self.run_id)


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
        self.loop = LabelLoop(cfg, self.layout, self.ledger, self.counts)  # the nightly label loop (input.labels)

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        if self.req.budget < 1:
            raise PipelineError(f"--budget must be a positive integer, got {self.req.budget}")
        writer = RunWriter(self.layout, self.cfg, corpus=self.req.corpus)
        try:
            writer.begin()
            return self._run(writer)
        finally:
            writer.close()  # gives the claim back unless another attempt holds it

    def _run(self, writer: RunWriter) -> RunResult:
        with DriverTelemetry() as self.telemetry:
            placement = self.place()
            self.loop.read_labels()
            # texts: the accepted rows with their text, lazy (read from the corpus again by each consumer)
            texts, rejected = self.read()
            embedded = self.embed(texts, placement)
            task = self.loop.task_model(placement)
            clusters = self.cluster(embedded, placement, task)
            del embedded  # from here the assigned dataset is the one corpus-sized dataset in the object store
            candidates = self.candidates(clusters)
            self.counts["candidates"] = candidates.num_rows
            candidates = self.loop.draw_audit(clusters.assigned, self.req.budget, candidates)
            scored = self.score(candidates, texts, placement)
            selected = self.select(scored, clusters.sizes)
            writer.history_table = self.loop.history_table()
            self.write(writer, selected, scored, clusters, rejected, texts)
            self.loop.record(writer, task, selected)
            return self.commit(writer, texts)

    # -- stages -----------------------------------------------------------------------------------
    def place(self) -> Placement:
        import ray

        resources, nodes = ray.cluster_resources(), ray.nodes()
        paths.check_shared(
            paths.local_paths(self.req.corpus, self.req.output, embed_cache=self.cfg.embed.cache,
                              model_cache=self.cfg.score.cache_dir),
            nodes, self.cfg.storage.shared_filesystem)
        self.ledger.held.see(resources, sum(1 for n in nodes if n.get("Alive")))
        placement = plan_placement(resources, self.cfg.resources, nodes=nodes)
        for note in placement.notes:
            log.info("placement: %s", note)
        return placement

    def read(self):
        cfg = self.cfg.input
        fs, path = filesystem_for(self.req.corpus, self.cfg.storage)
        prefix = "s3://" if self.req.corpus.startswith("s3://") else ""
        with self.ledger.stage("read", cpus=_total_cpus()) as st:
            files = rd.list_corpus_files(fs, path, display_uri(self.req.corpus, path))
            infos = rd.inspect_files(fs, files, cfg, prefix)
            total = sum(f.rows for f in infos)
            if total == 0:
                raise rd.CorpusError(f"corpus {display_uri(self.req.corpus, path)} is empty (0 rows in {len(files)} files)")
            encoder_dim = iv.encoder_dimension(self.cfg.embed.model) if cfg.embedding_column else None
            dim = rd.vector_dimension(fs, infos, cfg, encoder_dim, prefix)
            spill.preflight(self.cfg.ray, total, dim or iv.encoder_dimension(self.cfg.embed.model))  # before compute
            excluded = rs.exclusions(self.cfg, self.layout.output, self.req.ref(), self.loop.hashes())
            tasks = rd.read_tasks(infos)  # runs of row groups: a big file is read by several tasks
            marked, keys, scan = rs.validated(fs, tasks, self.cfg, prefix, dim, excluded, total)
            # Nothing corpus-sized stays materialised: the accepted rows are re-read by each consumer (embed,
            # the candidates' text); only the rejects (slim, sized by the bad rows) are kept.
            rejected = keys.filter(expr=~col(rd.REASON).is_null()).map_batches(
                flow.reject_rows, fn_kwargs={"files": [prefix + f for f in files]}, batch_format="pyarrow"
            ).materialize()
            del keys
            n_rejected, n_excluded = rejected.count(), scan.excluded
            accepted = marked.filter(expr=col(rd.REASON).is_null())
            self.loop.hold_labelled(accepted)  # before the exclusion drops them: the task model needs them
            accepted = rs.exclude(accepted, excluded)
            st.docs = total
            st.extra["excluded_docs"] = n_excluded
            st.extra["truncated_chars_docs"] = scan.truncated
            st.extra["read_tasks"] = len(tasks)
        self._check(rd.CONTRACT, accepted, output=True)
        self.counts.update(input_docs=total, rejected_docs=n_rejected, excluded_docs=n_excluded,
                           input_files=len(files), accepted_docs=total - n_rejected - n_excluded)
        log.info("read: %d docs from %d files, %d rejected, %d excluded (selected before or listed in "
                 "input.exclude_ids)", total, len(files), n_rejected, n_excluded)
        return accepted, rejected

    def embed(self, accepted, placement: Placement):
        self._check(emb.CONTRACT, accepted)
        if self.counts["accepted_docs"] == 0:
            raise PipelineError("no documents left: every row was rejected or excluded (see the read stage above)")
        if self.cfg.input.embedding_column:
            with self.ledger.stage("embed", cpus=_total_cpus()) as st:
                embedded = given_vectors(accepted)
                st.extra.update(reused=0, given=embedded.count(), actors=0)
                self.nodes.update(flow.node_ids(embedded))
            self.counts["accepted_docs"] = embedded.count()
            self._check(emb.CONTRACT, embedded, output=True)
            log.info("embed: skipped, %d vectors from input.embedding_column %r", embedded.count(),
                     self.cfg.input.embedding_column)
            return embedded
        p = placement.embed
        keep = [DOC_ID, TEXT]
        cache = EmbeddingCache(self.layout.output, self.cfg.embed) if self.cfg.embed.cache else None
        with self.ledger.stage("embed", cpus=p.num_cpus * p.concurrency, gpus=p.num_gpus * p.concurrency) as st:
            todo, reused = accepted.select_columns(keep), None
            if cache is not None:
                todo = todo.map_batches(add_text_hash, batch_format="pyarrow")
                todo, reused = cache.split(todo, keep, self.counts["input_docs"])
            n_reused = reused.count() if reused is not None else 0
            # The text leaves here; it comes back from the corpus only for the candidates and selected/.
            slim = list(EMBEDDED_COLUMNS)
            if reused is not None and todo.count() == 0:
                embedded = reused.select_columns(slim)  # everything came from the cache: no encoder to start
            else:
                embedded = embed_pool(todo, self.cfg.embed, p, cache).select_columns(slim)
                if n_reused:
                    embedded = embedded.union(reused.select_columns(slim))
            embedded = embedded.materialize()
            st.docs = embedded.count() - n_reused  # documents actually embedded in this run
            st.extra.update(reused=n_reused, actors=p.concurrency)
            self.nodes.update(flow.node_ids(embedded))
        self.counts["accepted_docs"] = st.docs + n_reused
        self._check(emb.CONTRACT, embedded, output=True)
        log.info("embed: %d docs in %.1fs, %d reused from the cache", st.docs, st.wall_s, n_reused)
        return embedded

    def cluster(self, embedded, placement: Placement, task_model: Optional[TaskModel] = None) -> Clusters:
        import ray

        self._check(clu.CONTRACT, embedded)
        n = self.counts["accepted_docs"]
        k = clu.choose_k(n, self.req.budget, self.cfg.cluster)
        use_gpu = placement.cluster_use_gpu
        with self.ledger.stage("cluster", cpus=_total_cpus(), gpus=1.0 if use_gpu else 0.0) as st:
            sample_n = clu.train_sample_size(n, k, self.cfg.cluster)
            sample = flow.training_sample(embedded, n, sample_n, k, self.cfg.cluster.seed)
            init, warm_from = (cs.warm_start(self.layout.output, self.req.ref(), k, sample.shape[1])
                               if self.cfg.cluster.warm_start else (None, None))
            train = ray.remote(flow.train_remote).options(num_gpus=1 if use_gpu else 0, num_cpus=1)
            centroids, objective = ray.get(train.remote(sample, k, self.cfg.cluster, use_gpu, init))
            assigned = embedded.map_batches(
                clu.Assigner,
                fn_constructor_kwargs={"centroids": ray.put(centroids), "seed": self.cfg.select.seed,
                                       "task_model": ray.put(task_model) if task_model is not None else None},
                compute=ActorPoolStrategy(size=placement.embed.concurrency),
                num_cpus=1,
                batch_format="numpy",
            ).materialize()
            counts = flow.collect(assigned.map_batches(flow.block_counts, fn_kwargs={"k": k}, batch_format="pyarrow"))
            sizes = np.sum([np.asarray(c) for c in counts["counts"].to_pylist()], axis=0)
            st.docs = n
            st.extra.update(k=k, train_sample=int(len(sample)), objective=objective, faiss_gpu=use_gpu,
                            seeding="warm_start" if init is not None else clu.seeding(k, self.cfg.cluster),
                            warm_start_from=warm_from)
        self._check(clu.CONTRACT, assigned, output=True)
        self.counts["clusters"] = k
        log.info("cluster: k=%d trained on %d docs, assigned %d in %.1fs", k, len(sample), n, st.wall_s)
        return Clusters(assigned, centroids, np.asarray(sizes, dtype=np.int64))

    def candidates(self, clusters: Clusters) -> pa.Table:
        """The candidates with their vectors and cluster columns (from ``clusters.assigned``), no text.

        The per-cluster top-k runs on the cluster over slim columns; the picked rows are then fetched in one
        distributed filter, so the driver holds candidate-sized tables, never the corpus.
        """
        self._check(cand.CONTRACT, clusters.assigned)
        assigned_columns = flow.columns_of(clusters.assigned)
        near_key = MARGIN if MARGIN in assigned_columns else DISTANCE
        plan = cand.plan_candidates(clusters.sizes, self.req.budget, self.cfg.candidates, near_key=near_key,
                                    distance_weight=self.cfg.select.margin_distance_weight)
        columns = [c for c in assigned_columns if c not in {TEXT, NODE_ID, BUSY_S, ACTOR_ID}]
        try:
            table = flow.per_cluster_candidates(clusters.assigned, plan, columns)
        except ValueError as exc:
            raise PipelineError(f"stage candidates: {exc}") from None
        if table.num_rows:
            self._check(cand.CONTRACT, table, output=True)
        log.info("candidates: %d from %d clusters (budget %d)", table.num_rows, int((clusters.sizes > 0).sum()),
                 self.req.budget)
        return table

    def score(self, candidates: pa.Table, texts, placement: Placement) -> pa.Table:
        """The LLM's uncertainty for every candidate. The text is read back from the corpus for the candidates
        alone, on the cluster, and never reaches the driver; only the scores come back."""
        p = placement.score
        if not self.loop.wants_llm() or candidates.num_rows == 0:
            self.counts["candidates_scored"] = 0
            return candidates
        from labelnext.ops.score import scorer as sc
        from labelnext.ops.score.choices import as_list_columns

        score_cfg = self.loop.score_settings(self.cfg.score)
        with self.ledger.stage("score", cpus=p.num_cpus * p.concurrency, gpus=p.num_gpus * p.concurrency) as st:
            ds = flow.rows_dataset(texts, candidates.column(DOC_ID), [DOC_ID, TEXT], sc.docs_per_batch(score_cfg))
            contract = sc.contract_for(score_cfg)
            self._check(contract, ds)
            scored = flow.collect(sc.score_dataset(
                ds, score_cfg, use_gpu=p.use_gpu, concurrency=p.concurrency, num_gpus=p.num_gpus,
                num_cpus=p.num_cpus, tensor_parallel_size=p.tensor_parallel_size))
            self._check(contract, scored, output=True)
            scored, repeated = exactly_once(candidates.column(DOC_ID), as_list_columns(scored))
            st.docs = scored.num_rows
            st.tokens = int(pa.compute.sum(scored.column("n_tokens")).as_py() or 0)
            st.extra["actors"] = p.concurrency
            st.extra["repeated_rows_dropped"] = repeated
            if BUSY_S in scored.column_names:
                st.extra["busy_s"] = float(pa.compute.sum(scored.column(BUSY_S)).as_py() or 0.0)
            if NODE_ID in scored.column_names:
                self.nodes.update(scored.column(NODE_ID).to_pylist())
            if ACTOR_ID in scored.column_names:
                st.extra["rows_per_actor"] = sorted(
                    pa.compute.value_counts(scored.column(ACTOR_ID)).field("counts").to_pylist(), reverse=True)
                if BUSY_S in scored.column_names:  # each actor's own rate, for the full-pass counterfactual
                    per_actor = scored.group_by(ACTOR_ID).aggregate([("n_tokens", "sum"), (BUSY_S, "sum")])
                    st.extra["busy_by_actor"] = {
                        str(a): (int(t or 0), float(b or 0.0)) for a, t, b in zip(
                            per_actor.column(ACTOR_ID).to_pylist(), per_actor.column("n_tokens_sum").to_pylist(),
                            per_actor.column(f"{BUSY_S}_sum").to_pylist())}
            st.extra["truncated_docs"] = int(pa.compute.sum(scored.column("truncated").cast(pa.int64())).as_py() or 0)
            st.extra["backend"] = sc.choose_backend(score_cfg.backend, choices=bool(score_cfg.task.choices))
            st.extra["prompt"] = ("plain text" if not score_cfg.prompted else
                                  f"{len(score_cfg.task.choices)} choices" if score_cfg.task.choices else "generative")
        self.counts["candidates_scored"] = st.docs
        log.info("score: %d candidates, %d tokens in %.1fs", st.docs, st.tokens, st.wall_s)
        return flow.attach_columns(candidates, scored.select([DOC_ID, *sc.score_columns(score_cfg)]))

    def select(self, scored: pa.Table, sizes: np.ndarray) -> pa.Table:
        contract = sel.contract(self.cfg.select, margin=MARGIN in scored.column_names)
        if scored.num_rows:
            self._check(contract, scored)
        with self.ledger.stage("select", cpus=1) as st:
            selected = self.loop.select(scored, sizes, self.req.budget)
            st.docs = selected.num_rows
        self._check(contract, selected, output=True)
        self.counts["selected"] = selected.num_rows
        log.info("select: %d documents (%s)", selected.num_rows, selection_rule(self.cfg.select, scored.column_names))
        return selected

    def write(self, writer: RunWriter, selected: pa.Table, scored: pa.Table, clusters: Clusters, rejected,
              texts) -> None:
        with self.ledger.stage("write", cpus=_total_cpus()) as st:
            writer.write_outputs(
                selected=flow.with_columns(selected, scored, texts, [
                    *([TEXT] if self.cfg.output.include_text else []), *self.cfg.input.passthrough_columns]),
                scores=scored.drop_columns([c for c in (EMBEDDING, TEXT, RAND_KEY, NODE_ID, BUSY_S)
                                            if c in scored.column_names]),
                assigned=clusters.assigned,
                rejected=rejected,
                centroids=clusters.centroids,
                sizes=clusters.sizes,
                candidate_texts=scored.select([DOC_ID, TEXT]) if TEXT in scored.column_names else None,
                corpus_texts=texts,
            )
            st.docs = selected.num_rows

    def commit(self, writer: RunWriter, texts) -> RunResult:
        import ray

        tokens, sample_docs = estimate_corpus_tokens(texts, self.counts["accepted_docs"], self.cfg)
        resources = ray.cluster_resources()
        self.ledger.held.see(resources, sum(1 for n in ray.nodes() if n.get("Alive")))
        hardware = {"cluster_resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")},
                    "nodes": sorted(self.nodes)}
        report = build_report(self.ledger, budget=self.req.budget, accepted_docs=self.counts["accepted_docs"],
                              corpus_tokens_estimate=tokens, token_sample_docs=sample_docs,
                              scoring_model_params=writer.scoring_model_params(), hardware=hardware)
        report.update(self.telemetry.report())  # driver.rows_collected, driver.peak_rss_bytes, object_store
        report["cluster"] = {"nodes": sorted(self.nodes)}
        if self.loop.info is not None:
            report["task_model"] = self.loop.info
        manifest = writer.commit(report, self.counts, task_model=self.loop.info)
        return RunResult(run_uri=self.layout.uri(), manifest=manifest, cost_report=report)

    @staticmethod
    def _check(contract, data, output: bool = False) -> None:
        try:
            (flow.check_output if output else flow.check_input)(contract, data)
        except ContractError as exc:
            raise PipelineError(str(exc)) from None


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


def _total_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def estimate_corpus_tokens(texts, n: int, cfg: RunConfig) -> tuple[float, int]:
    """(estimated scoring tokens of the ``n`` accepted documents, documents in the seeded random sample).

    Also when nothing was scored: the full-pass counterfactuals price the corpus's tokens whatever the rule.
    """
    if n == 0:
        return 0.0, 0
    from labelnext.ops.score.scorer import count_tokens

    sample = sample_texts(texts, n, cfg.cost.token_sample, cfg.select.seed)
    counts = count_tokens(sample, cfg.score, window=True)
    return (float(np.mean(counts) * n) if len(counts) else 0.0), len(sample)


def run_pipeline(cfg: RunConfig, request: RunRequest) -> RunResult:
    from labelnext.ops.core.quiet import quiet_third_party

    quiet_third_party()
    flow.init_ray(cfg)
    return SelectionPipeline(cfg, request).run()
