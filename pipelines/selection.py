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
from labelnext.ops.io import labels as lb
from labelnext.ops.io import read as rd
from labelnext.ops.select import selector as sel
from labelnext.ops.core.columns import (DISTANCE, DOC_ID, EMBEDDING, ID_HASH, MARGIN, PREDICTED_LABEL, RAND_KEY,
                                   SCORE_COLUMNS, TEXT, TEXT_HASH)
from labelnext.ops.core.contract import ContractError
from labelnext.ops.embed.cache import EmbeddingCache, add_text_hash
from labelnext.ops.core.instrument import ACTOR_ID, BUSY_S, NODE_ID, instrumented
from labelnext.ops.io.storage import RunLayout, display_uri, filesystem_for
from labelnext.ops.select.task_model import TaskModel, cross_validated_accuracy
from labelnext.pipelines import dataflow as flow
from labelnext.pipelines import ledger, paths
from labelnext.pipelines.commit import RunWriter
from labelnext.pipelines.config import RunConfig
from labelnext.pipelines.cost import CostLedger, build_report, sample_texts
from labelnext.pipelines.placement import Placement, faiss_use_gpu, plan_placement
from labelnext.pipelines.telemetry import DriverTelemetry

log = logging.getLogger("labelnext")

# Kept importable from here: the CLI and tests start Ray the way a run does.
init_ray = flow.init_ray


TASK_MODEL_FILE = "task_model.parquet"


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
        # The nightly label loop (input.labels): None on a cold start.
        self.labels: Optional[lb.LabelSet] = None
        self.labelled_rows = None  # labelled documents of tonight's corpus (held back from the selection)
        self.task_info: Optional[dict[str, Any]] = None

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
            self.labels = self.read_labels()
            # texts: the accepted rows with their text, lazy (read from the corpus again by each consumer)
            texts, rejected = self.read()
            embedded = self.embed(texts, placement)
            task = self.task_model(placement)
            clusters = self.cluster(embedded, placement, task)
            del embedded  # from here the assigned dataset is the one corpus-sized dataset in the object store
            candidates = self.candidates(clusters)
            self.counts["candidates"] = candidates.num_rows
            scored = self.score(candidates, texts, placement)
            selected = self.select(scored, clusters.sizes)
            self.write(writer, selected, scored, clusters, rejected, texts)
            self.record_task_model(writer, task, selected)
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
            encoder_dim = iv.encoder_dimension(self.cfg.embed.model) if cfg.embedding_column else None
            dim = rd.vector_dimension(fs, infos, cfg, encoder_dim, prefix)
            excluded = self._exclusions()
            tasks = rd.read_tasks(infos)  # runs of row groups: a big file is read by several tasks
            marked, keys, scan = self._validated(fs, tasks, prefix, dim, excluded, total)
            # Nothing corpus-sized stays materialised: the accepted rows are re-read by each consumer (embed,
            # the candidates' text); only the rejects (slim, sized by the bad rows) are kept.
            rejected = keys.filter(expr=~col(rd.REASON).is_null()).map_batches(
                flow.reject_rows, fn_kwargs={"files": [prefix + f for f in files]}, batch_format="pyarrow"
            ).materialize()
            del keys
            n_rejected, n_excluded = rejected.count(), scan.excluded
            accepted = self._exclude(marked.filter(expr=col(rd.REASON).is_null()), excluded)
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
            return self._given_vectors(accepted)
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
                embedded = self._embed_pool(todo, placement, cache).select_columns(slim)
                if n_reused:
                    embedded = embedded.union(reused.select_columns(slim))
            embedded = embedded.materialize()
            st.docs = embedded.count() - n_reused  # documents actually embedded in this run
            st.extra.update(reused=n_reused, actors=p.concurrency)
            self._record_nodes(embedded)
        self.counts["accepted_docs"] = st.docs + n_reused
        self._check(emb.CONTRACT, embedded, output=True)
        log.info("embed: %d docs in %.1fs, %d reused from the cache", st.docs, st.wall_s, n_reused)
        return embedded

    def _given_vectors(self, accepted):
        """``input.embedding_column``: the corpus's own vectors, validated and normalised by the reader."""
        with self.ledger.stage("embed", cpus=self._total_cpus()) as st:
            embedded = accepted.select_columns([DOC_ID, EMBEDDING]).map_batches(
                flow.as_embedded, batch_format="numpy").materialize()
            st.extra.update(reused=0, given=embedded.count(), actors=0)
            self._record_nodes(embedded)
        self.counts["accepted_docs"] = embedded.count()
        self._check(emb.CONTRACT, embedded, output=True)
        log.info("embed: skipped, %d vectors from input.embedding_column %r", embedded.count(),
                 self.cfg.input.embedding_column)
        return embedded

    def cluster(self, embedded, placement: Placement, task_model: Optional[TaskModel] = None) -> Clusters:
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
        if not sel.uses_llm(self.cfg.select) or candidates.num_rows == 0 or self._llm_skipped():
            self.counts["candidates_scored"] = 0
            return candidates
        from labelnext.ops.score import scorer as sc

        with self.ledger.stage("score", cpus=p.num_cpus * p.concurrency, gpus=p.num_gpus * p.concurrency) as st:
            ds = flow.rows_dataset(texts, candidates.column(DOC_ID), [DOC_ID, TEXT], sc.docs_per_batch(self.cfg.score))
            self._check(sc.CONTRACT, ds)
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
            st.extra["backend"] = sc.choose_backend(self.cfg.score.backend)
        self.counts["candidates_scored"] = st.docs
        log.info("score: %d candidates, %d tokens in %.1fs", st.docs, st.tokens, st.wall_s)
        return flow.attach_columns(candidates, scored.select([DOC_ID, *SCORE_COLUMNS]))

    def select(self, scored: pa.Table, sizes: np.ndarray) -> pa.Table:
        contract = sel.contract(self.cfg.select, margin=MARGIN in scored.column_names)
        if scored.num_rows:
            self._check(contract, scored)
        with self.ledger.stage("select", cpus=1) as st:
            label_counts = self.labels.counts() if self.labels is not None else None
            selected = sel.Selector(self.cfg.select, label_counts=label_counts).select(scored, sizes, self.req.budget)
            st.docs = selected.num_rows
        self._check(contract, selected, output=True)
        self.counts["selected"] = selected.num_rows
        log.info("select: %d documents (rule %s)", selected.num_rows, self.cfg.select.rule)
        return selected

    def write(self, writer: RunWriter, selected: pa.Table, scored: pa.Table, clusters: Clusters, rejected,
              texts) -> None:
        with self.ledger.stage("write", cpus=self._total_cpus()) as st:
            writer.write_outputs(
                selected=self._with_text(selected, scored, texts),
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

        tokens, sample_docs = self.estimate_corpus_tokens(texts)
        resources = ray.cluster_resources()
        self.ledger.held.see(resources, sum(1 for n in ray.nodes() if n.get("Alive")))
        report = build_report(
            self.ledger,
            budget=self.req.budget,
            accepted_docs=self.counts["accepted_docs"],
            corpus_tokens_estimate=tokens,
            token_sample_docs=sample_docs,
            scoring_model_params=writer.scoring_model_params(),
            hardware={"cluster_resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")},
                      "nodes": sorted(self.nodes)},
        )
        report.update(self.telemetry.report())  # driver.rows_collected, driver.peak_rss_bytes, object_store
        report["cluster"] = {"nodes": sorted(self.nodes)}
        if self.task_info is not None:
            report["task_model"] = self.task_info
        manifest = writer.commit(report, self.counts, task_model=self.task_info)
        return RunResult(run_uri=self.layout.uri(), manifest=manifest, cost_report=report)

    def estimate_corpus_tokens(self, embedded) -> tuple[float, int]:
        """(estimated scoring tokens of every accepted document, documents in the seeded random sample).

        Also when nothing was scored: the full-pass counterfactuals price the corpus's tokens whatever the rule.
        """
        n = self.counts["accepted_docs"]
        if n == 0:
            return 0.0, 0
        from labelnext.ops.score.scorer import count_tokens

        texts = sample_texts(embedded, n, self.cfg.cost.token_sample, self.cfg.select.seed)
        # count_tokens and n_tokens count predicted positions: a window of max_tokens predicts max_tokens - 1.
        counts = np.minimum(count_tokens(texts, self.cfg.score), self.cfg.score.max_tokens - 1)
        return (float(np.mean(counts) * n) if len(counts) else 0.0), len(texts)

    # -- the nightly label loop (input.labels) ------------------------------------------------------
    def read_labels(self) -> Optional[lb.LabelSet]:
        """The labels so far, one row per labelled document (driver-side, like the ledger's ids)."""
        cfg = self.cfg.input
        if not cfg.labels:
            return None
        labels = lb.read_labels(cfg.labels, cfg.label_id_column, cfg.label_column, self.cfg.storage)
        for note in labels.notes:
            log.warning("labels: %s", note)
        log.info("labels: %d labelled documents from %d files (%d rows; skipped: %d null, %d superseded "
                 "duplicates)", len(labels), labels.files, labels.rows, labels.null_labels, labels.duplicate_labels)
        return labels

    def task_model(self, placement: Placement) -> Optional[TaskModel]:
        """The labelled documents' vectors, the task model trained on them, and its record for the manifest.

        None, and a cold start, without labels or when the labels that have a vector cover fewer than two classes.
        """
        labels = self.labels
        if labels is None:
            return None
        cfg = self.cfg.select.task_model
        vectors, sources = self._label_vectors(placement) if len(labels) else ({}, {})
        model, accuracy, folds = None, None, 0
        with self.ledger.stage("select", cpus=1) as st:
            train = lb.training_set(labels, vectors, cfg.max_labels, cfg.seed)
            classes = np.unique(train.y)
            if classes.size >= 2:
                model = TaskModel.fit(train.x, train.y, c=cfg.c)
                accuracy, folds = cross_validated_accuracy(train.x, train.y, cfg)
        st.extra["task_model_s"] = round(st.wall_s, 3)
        self.counts.update(label_rows=labels.rows, null_labels=labels.null_labels,
                           duplicate_labels=labels.duplicate_labels, labelled_docs=len(labels),
                           labels_without_embedding=train.without_embedding, labels_used=len(train.y))
        self.task_info = {**labels.summary(), "labels_used": len(train.y),
                          "labels_without_embedding": train.without_embedding, "vectors_from": sources,
                          "classes": classes.tolist(), "cv_accuracy": accuracy, "cv_folds": folds}
        if model is None:
            self.task_info["status"] = (f"not trained: the labels with a vector cover {classes.size} class(es), "
                                        "a task model needs 2; this run is a cold start")
            log.warning("task model: %s", self.task_info["status"])
            return None
        self.task_info["status"] = "trained"
        self.task_info["llm_scoring"] = self._llm_decision()
        if self._llm_skipped():
            self.ledger.stages["score"].extra["skipped"] = self.task_info["llm_scoring"]
        log.info("task model: %d classes from %d labels (%d without a vector), cross-validated accuracy %s",
                 classes.size, len(train.y), train.without_embedding,
                 "n/a" if accuracy is None else f"{accuracy:.3f}")
        return model

    def record_task_model(self, writer: RunWriter, task: Optional[TaskModel], selected: pa.Table) -> None:
        """Save the task model next to the run's outputs; note the selection's predicted labels."""
        if self.task_info is None:
            return
        self.task_info["selected_predicted_counts"] = lb.label_counts(selected.column(PREDICTED_LABEL))
        if task is not None:
            writer.write_table(TASK_MODEL_FILE, task.to_table())
            self.task_info["file"] = TASK_MODEL_FILE

    def _llm_decision(self) -> str:
        if not sel.uses_llm(self.cfg.select):
            return f"off: select.rule {self.cfg.select.rule} scores nothing"
        if self.cfg.select.llm_with_labels:
            return "on: select.llm_with_labels is true (the LLM's entropy breaks near-ties of the margin)"
        return ("skipped: labels exist and select.llm_with_labels is false; the task model's margin ranks the "
                "candidates, and neither the LLM's entropy nor a probe on its hidden states added to it on the "
                "label-loop benchmark (bench/quality.py --rounds)")

    def _llm_skipped(self) -> bool:
        info = self.task_info
        return info is not None and info.get("status") == "trained" and not self.cfg.select.llm_with_labels

    def _hold_labelled(self, accepted) -> None:
        """Keep tonight's labelled documents aside before they are excluded: the task model needs their vectors."""
        import ray

        if self.labels is None or not len(self.labels):
            return
        columns = [DOC_ID, TEXT, ID_HASH, *([EMBEDDING] if self.cfg.input.embedding_column else [])]
        self.labelled_rows = accepted.select_columns(columns).map_batches(  # lazy: read once, by _label_vectors
            lb.keep_ids, fn_kwargs={"hashes": ray.put(self.labels.hashes())}, batch_format="pyarrow")

    def _label_vectors(self, placement: Placement) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Vectors of the labelled documents (label-sized on the driver) and how many came from where.

        Tonight's labelled documents take their cached vector when the cache holds the same text, else they
        are embedded now (and cached); documents of earlier nights take theirs from the embedding cache. With
        ``input.embedding_column`` tonight's documents bring their own vectors.
        """
        import ray

        if self.cfg.input.embedding_column and self.labelled_rows is not None:
            given = lb.collect_columns(self.labelled_rows.select_columns([DOC_ID, EMBEDDING]).map_batches(
                flow.as_embedded, batch_format="numpy").iter_batches(batch_format="numpy"), (DOC_ID, EMBEDDING))
            return dict(zip(given[DOC_ID], given[EMBEDDING])), {"tonight_given": len(given[DOC_ID])}
        cache = EmbeddingCache(self.layout.output, self.cfg.embed) if self.cfg.embed.cache else None
        files = cache.files() if cache is not None else []
        cached: dict[str, Any] = {DOC_ID: [], "text_hash": [], EMBEDDING: np.zeros((0, 0), np.float32)}
        if files:
            rows = ray.data.read_parquet(files, filesystem=cache.fs, columns=[DOC_ID, "text_hash", EMBEDDING],
                                         partitioning=None).map_batches(
                lb.keep_ids, fn_kwargs={"hashes": ray.put(self.labels.hashes())}, batch_format="pyarrow")
            cached = lb.collect_columns(rows.iter_batches(batch_format="numpy"), (DOC_ID, "text_hash", EMBEDDING))
        tonight = keys = None
        if self.labelled_rows is not None:
            tonight = self.labelled_rows.map_batches(add_text_hash, batch_format="pyarrow").materialize()
            keys = lb.collect_columns(tonight.select_columns([DOC_ID, TEXT_HASH]).iter_batches(batch_format="numpy"),
                                      (DOC_ID, TEXT_HASH))
        keys = keys or {DOC_ID: [], TEXT_HASH: []}
        vectors, todo = lb.match_vectors((keys[DOC_ID], keys[TEXT_HASH]),
                                         (cached[DOC_ID], cached["text_hash"], cached[EMBEDDING]))
        log.info("labels: %d labelled documents in tonight's corpus, %d vectors from the embedding cache, %d to "
                 "embed", len(keys[DOC_ID]), len(vectors), len(todo))
        if todo:
            p = placement.embed
            with self.ledger.stage("embed", cpus=p.num_cpus * p.concurrency, gpus=p.num_gpus * p.concurrency) as st:
                rows = tonight.map_batches(lb.keep_ids, fn_kwargs={"hashes": np.unique(rd.id_hash(todo))},
                                           batch_format="pyarrow")
                rows = rows.select_columns([DOC_ID, TEXT, TEXT_HASH] if cache is not None else [DOC_ID, TEXT])
                fresh = lb.collect_columns(self._embed_pool(rows, placement, cache).select_columns(
                    [DOC_ID, EMBEDDING]).iter_batches(batch_format="numpy"), (DOC_ID, EMBEDDING))
                vectors.update(zip(fresh[DOC_ID], fresh[EMBEDDING]))
                st.docs += len(fresh[DOC_ID])
                st.extra["labelled_embedded"] = len(fresh[DOC_ID])
        tonight_ids = set(keys[DOC_ID])
        return vectors, {"tonight_cached": len(tonight_ids) - len(todo), "tonight_embedded": len(todo),
                         "earlier_cache": sum(1 for d in vectors if d not in tonight_ids)}

    # -- helpers ----------------------------------------------------------------------------------
    def _validated(self, fs, tasks: list, prefix: str, dim: Optional[int], excluded: np.ndarray, total: int):
        """Every corpus row validated, exact duplicate ids marked as rejects (first occurrence kept): the rows
        (lazy: each consumer reads the corpus again), the same rows' slim keys, and the duplicate scan.

        Duplicates are found by a hash shuffle of the slim keys, so the driver never holds a key per row.
        """
        validated = flow.read_corpus(tasks, fs, self.cfg.input, prefix, dim)
        keys = validated.select_columns(list(rd.KEY_COLUMNS)).materialize()
        scan = flow.duplicate_scan(keys, excluded, total)
        mark = {"fn_kwargs": {"dups": scan.dups}, "batch_format": "pyarrow"}
        return (validated.map_batches(flow.mark_duplicates, **mark), keys.map_batches(flow.mark_duplicates, **mark),
                scan)

    def _exclude(self, accepted, excluded: np.ndarray):
        """Drop ids the ledger or ``input.exclude_ids`` name (``excluded``: their sorted id hashes)."""
        import ray

        if not excluded.size:
            return accepted
        self._hold_labelled(accepted)
        return accepted.map_batches(ledger.drop_excluded, fn_kwargs={"excluded": ray.put(excluded)},
                                    batch_format="pyarrow")

    def _exclusions(self) -> np.ndarray:
        """Sorted id hashes to leave out: the ledger of committed runs dated before this one (so a backfill of
        an earlier night reproduces it) and ``input.exclude_ids``."""
        parts = []
        if self.cfg.output.ledger:
            hashes, runs = ledger.ledger_hashes(self.layout.output, ledger.RunRef(self.req.run_date, self.req.run_id))
            log.info("ledger: %d ids selected by %d committed runs before %s", hashes.size, len(runs),
                     self.req.run_date)
            parts.append(hashes)
        if self.cfg.input.exclude_ids:
            hashes = ledger.user_hashes(self.cfg.input.exclude_ids, self.cfg.input.exclude_id_column, self.cfg.storage)
            log.info("input.exclude_ids: %d ids", hashes.size)
            parts.append(hashes)
        if self.labels is not None and len(self.labels):
            parts.append(self.labels.hashes())  # labelled documents are never selected again
        return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)

    def _embed_pool(self, todo, placement: Placement, cache: Optional[EmbeddingCache]):
        from labelnext.ops.embed.tokenize import tokenize_dataset

        p = placement.embed
        batch_size = emb.ray_batch_docs(self.cfg.embed, p.use_gpu)
        # Token ids come from CPU tasks, so GPU actors only run the encoder.
        embedded = tokenize_dataset(todo, self.cfg.embed, batch_size=batch_size).map_batches(
            instrumented(emb.Embedder),
            fn_constructor_kwargs={"cfg": self.cfg.embed, "device": "cuda" if p.use_gpu else "cpu"},
            batch_size=batch_size,
            compute=ActorPoolStrategy(size=p.concurrency),
            num_cpus=p.num_cpus,
            num_gpus=p.num_gpus if p.use_gpu else 0,
            batch_format="numpy",
        )
        if cache is not None:
            embedded = embedded.map_batches(cache.write, batch_format="numpy")
        return embedded

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

    def _with_text(self, selected: pa.Table, scored: pa.Table, texts) -> pa.Table:
        """selected/ with its text (``output.include_text``) and passthrough columns: from the scored candidates
        when they carry them, else read back from the corpus for the selected documents alone."""
        extra = [*self.cfg.input.passthrough_columns]
        if self.cfg.output.include_text:
            extra.insert(0, TEXT)
        have = [c for c in extra if c in scored.column_names]
        if have:
            selected = flow.attach_columns(selected, scored.select([DOC_ID, *have]))
        missing = [c for c in extra if c not in have]
        if not missing or selected.num_rows == 0:
            return selected
        return flow.attach_columns(selected, flow.rows_for_ids(texts, selected.column(DOC_ID), [DOC_ID, *missing]))

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
    from labelnext.ops.core.quiet import quiet_third_party

    quiet_third_party()
    flow.init_ray(cfg)
    return SelectionPipeline(cfg, request).run()
