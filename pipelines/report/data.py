"""What ``report.html`` shows about the selection, gathered at commit from bounded inputs.

The driver already holds the centroids (k x d), the selection (budget rows) and the scored candidates
(O(budget)); the examples nearest each centroid are the candidates of the "near_centroid" share. Texts the
page quotes come from the selection or the scored candidates; when a run carried no text with them (no LLM
scoring), a distributed filter reads just the quoted ids' texts. The corpus stays in the cluster: one
distributed pass over the assigned documents projects a seeded sample of them onto the centroids' two
principal axes and returns that sample and the positions of the highlighted selection.
Every table the page draws from is capped here, so the page size does not grow with the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labelnext.ops.cluster.kmeans import rand_keys
from labelnext.ops.core.columns import CANDIDATE_REASON, CLUSTER_ID, DISTANCE, DOC_ID, EMBEDDING, RAND_KEY, TEXT

MAP_DOCS = 2000  # sampled documents drawn on the map
MAP_SELECTED = 2000  # selected documents highlighted on the map
CLUSTERS_SHOWN = 24  # per-cluster sections, largest clusters first
EXAMPLES_PER_CLUSTER = 3  # texts nearest the centroid per section
SELECTED_PER_CLUSTER = 8  # selected texts per section
TEXT_CHARS = 280  # characters of each text shown
UNCERTAINTY = "uncertainty"
_KEY_BITS = 53  # rand_keys are 53-bit
_SALT = 104729  # the map's selected sample is drawn apart from the run's other seeded choices


@dataclass(frozen=True)
class ReportPlan:
    """The projection and the documents the page names, fixed on the driver before the distributed pass."""

    mean: np.ndarray  # (d,)
    basis: np.ndarray  # (d, 2): the centroids' first two principal axes
    sample_cutoff: int  # documents whose rand key is below it are drawn on the map
    shown_clusters: np.ndarray  # cluster ids with a section, largest first
    map_selected: np.ndarray  # selected doc ids highlighted on the map
    example_ids: np.ndarray  # nearest-to-centroid candidates quoted in the sections
    quoted_selected: np.ndarray  # selected doc ids quoted in the sections

    def wanted(self) -> np.ndarray:
        """Ids whose position the distributed pass returns besides the sample (at most ``MAP_SELECTED``)."""
        return np.unique(self.map_selected.astype(str))


@dataclass
class ReportView:
    """Everything the page draws, bounded; built by ``build_view``."""

    centroids_xy: np.ndarray  # (k, 2)
    sizes: np.ndarray  # (k,)
    selected_per_cluster: np.ndarray  # (k,)
    scored_per_cluster: np.ndarray  # (k,)
    docs: pa.Table  # doc_id, cluster_id, x, y: the seeded sample
    map_selected: pa.Table  # doc_id, cluster_id, x, y
    shown_clusters: np.ndarray
    examples: dict[int, list[dict]]  # cluster -> [{doc_id, distance, text}]
    quoted: dict[int, list[dict]]  # cluster -> selected rows with text
    selected_columns: list[str]
    uncertainty_scored: np.ndarray
    uncertainty_selected: np.ndarray
    n_selected: int = 0
    n_docs: int = 0


def principal_axes(centroids: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and first two principal axes (d x 2) of the non-empty centroids, by SVD; zero-padded."""
    c = np.asarray(centroids, dtype=np.float64)
    used = c[np.asarray(sizes) > 0] if len(c) else c
    d = c.shape[1] if c.ndim == 2 else 0
    basis = np.zeros((d, 2))
    if len(used) == 0:
        return np.zeros(d), basis
    mean = used.mean(axis=0)
    if len(used) > 1:
        _, _, vt = np.linalg.svd(used - mean, full_matrices=False)
        axes = vt[:2].T
        basis[:, : axes.shape[1]] = axes
    return mean, basis


def _as_matrix(values) -> np.ndarray:
    """A numpy batch's embedding column as a 2-D float array (tensor or list column)."""
    arr = np.asarray(values)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v, dtype=np.float32) for v in values]) if len(values) else np.zeros((0, 0))
    return arr.astype(np.float32, copy=False)


def _column(table: pa.Table, name: str) -> Optional[np.ndarray]:
    if name not in table.column_names:
        return None
    return table.column(name).to_numpy(zero_copy_only=False)


def _largest(sizes: np.ndarray, n: int) -> np.ndarray:
    order = np.lexsort((np.arange(len(sizes)), -np.asarray(sizes)))
    return np.array([c for c in order if sizes[c] > 0][:n], dtype=np.int64)


def _first_per_cluster(clusters: np.ndarray, order: np.ndarray, wanted: np.ndarray, per: int) -> np.ndarray:
    """Row indices: in ``order``, the first ``per`` rows of each cluster in ``wanted``."""
    keep, taken = [], {int(c): 0 for c in wanted}
    for i in order:
        c = int(clusters[i])
        if c in taken and taken[c] < per:
            taken[c] += 1
            keep.append(i)
    return np.array(keep, dtype=np.int64)


def _by_uncertainty(table: pa.Table) -> np.ndarray:
    """Row order: most uncertain first, then by rank (NaN and missing scores last)."""
    unc = _column(table, UNCERTAINTY)
    rank = _column(table, "rank")
    rank = np.arange(table.num_rows) if rank is None else rank.astype(np.float64)
    if unc is None:
        return np.argsort(rank, kind="stable")
    unc = np.nan_to_num(unc.astype(np.float64), nan=-np.inf)
    return np.lexsort((rank, -unc))


def plan_report(selected: pa.Table, scored: pa.Table, centroids: np.ndarray, sizes: np.ndarray,
                seed: int = 0) -> ReportPlan:
    sizes = np.asarray(sizes, dtype=np.int64)
    mean, basis = principal_axes(centroids, sizes)
    n = int(sizes.sum())
    fraction = min(1.0, 1.5 * MAP_DOCS / n) if n else 1.0
    shown = _largest(sizes, CLUSTERS_SHOWN)
    ids = _column(selected, DOC_ID)
    ids = np.empty(0, object) if ids is None else ids
    if len(ids) > MAP_SELECTED:
        keys = rand_keys([str(d) for d in ids], seed + _SALT)
        map_selected = ids[np.argsort(keys, kind="stable")[:MAP_SELECTED]]
    else:
        map_selected = ids
    quoted = np.empty(0, object)
    if selected.num_rows:
        rows = _first_per_cluster(_column(selected, CLUSTER_ID), _by_uncertainty(selected), shown, SELECTED_PER_CLUSTER)
        quoted = ids[rows]
    examples = np.empty(0, object)
    if scored.num_rows:
        reason = _column(scored, CANDIDATE_REASON)
        near = np.flatnonzero(reason == "near_centroid") if reason is not None else np.arange(scored.num_rows)
        dist = _column(scored, DISTANCE)
        order = near[np.argsort(dist[near], kind="stable")] if dist is not None else near
        rows = _first_per_cluster(_column(scored, CLUSTER_ID), order, shown, EXAMPLES_PER_CLUSTER)
        examples = _column(scored, DOC_ID)[rows]
    return ReportPlan(mean=mean, basis=basis, sample_cutoff=int(fraction * 2**_KEY_BITS), shown_clusters=shown,
                      map_selected=np.asarray(map_selected, dtype=object), example_ids=examples,
                      quoted_selected=quoted)


def sample_rows(batch: dict[str, np.ndarray], mean: np.ndarray, basis: np.ndarray, cutoff: int,
                wanted: np.ndarray) -> pa.Table:
    """One block of the distributed pass: the sampled and the wanted rows, projected to 2-D.

    What comes back to the driver is bounded by the sample size and the plan, whatever the corpus size.
    """
    ids = np.asarray(batch[DOC_ID]).astype(str)
    in_sample = np.asarray(batch[RAND_KEY]) < cutoff
    is_wanted = np.isin(ids, wanted)
    keep = np.flatnonzero(in_sample | is_wanted)
    xy = (_as_matrix(batch[EMBEDDING][keep]) - mean) @ basis if len(keep) else np.zeros((0, 2))
    distance = np.asarray(batch[DISTANCE])[keep] if DISTANCE in batch else np.full(len(keep), np.nan)
    return pa.table({
        DOC_ID: pa.array(ids[keep], pa.string()),
        CLUSTER_ID: pa.array(np.asarray(batch[CLUSTER_ID])[keep].astype(np.int64)),
        RAND_KEY: pa.array(np.asarray(batch[RAND_KEY])[keep].astype(np.int64)),
        "x": pa.array(xy[:, 0].astype(np.float32)),
        "y": pa.array(xy[:, 1].astype(np.float32)),
        DISTANCE: pa.array(distance.astype(np.float32)),
        "in_sample": pa.array(in_sample[keep]),
    })


def shorten(text) -> Optional[str]:
    """A text as the page quotes it: at most ``TEXT_CHARS`` characters."""
    if text is None:
        return None
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1].rstrip() + "\u2026"


def _per_cluster(table: pa.Table, k: int) -> np.ndarray:
    clusters = _column(table, CLUSTER_ID)
    if clusters is None or not len(clusters):
        return np.zeros(k, dtype=np.int64)
    return np.bincount(clusters.astype(np.int64), minlength=k)[:k]


def _llm_scored(candidates: pa.Table) -> pa.Table:
    """The candidates the LLM scored (a run without LLM scoring passes its candidates unscored)."""
    unc = _column(candidates, UNCERTAINTY)
    if unc is None:
        return candidates.slice(0, 0)
    return candidates.filter(pa.array(np.isfinite(unc.astype(np.float64))))


def _finite(values: Optional[np.ndarray]) -> np.ndarray:
    if values is None:
        return np.empty(0)
    v = values.astype(np.float64)
    return v[np.isfinite(v)]


def centroids_on_map(plan: ReportPlan, centroids: np.ndarray, sample: pa.Table) -> np.ndarray:
    """Where each cluster's documents sit on the map: its centroid direction scaled to the documents' mean.

    Embeddings and (spherical k-means) centroids are unit vectors, so a cluster's documents average to a
    shorter vector than its centroid: the centroid's direction times their mean cosine, ``1 - distance``.
    Projecting the bare centroid would draw every cluster outside its own documents. The mean cosine comes
    from the sampled documents of the cluster, or of all clusters where a cluster has none in the sample.
    """
    c = np.asarray(centroids, dtype=np.float64)
    if not len(c):
        return np.zeros((0, 2))
    direction = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    cos = np.ones(len(c))
    dist = _column(sample, DISTANCE) if sample.num_rows else None
    if dist is not None and np.isfinite(dist).any():
        ok = np.isfinite(dist)
        clusters = _column(sample, CLUSTER_ID)[ok].astype(np.int64)
        counts = np.bincount(clusters, minlength=len(c))[: len(c)]
        sums = np.bincount(clusters, weights=1.0 - dist[ok], minlength=len(c))[: len(c)]
        cos = np.where(counts > 0, sums / np.maximum(counts, 1), float(np.mean(1.0 - dist[ok])))
    return (direction * cos[:, None] - plan.mean) @ plan.basis


def quoted_ids(plan: ReportPlan) -> set[str]:
    return set(np.concatenate([plan.example_ids, plan.quoted_selected]).astype(str).tolist())


def rows_with_ids(table: pa.Table, ids: np.ndarray) -> pa.Table:
    """Ray Data batch function: the rows whose doc_id is in ``ids``."""
    return table.filter(pc.is_in(pc.cast(table.column(DOC_ID), pa.string()), value_set=pa.array(ids, pa.string())))


def _texts_of(plan: ReportPlan, texts: Optional[pa.Table]) -> dict[str, Optional[str]]:
    """Texts of the documents the sections quote, from a (doc_id, text) table."""
    if texts is None or TEXT not in texts.column_names or not texts.num_rows:
        return {}
    quoted = quoted_ids(plan)
    return {str(d): shorten(t) for d, t in zip(texts.column(DOC_ID).to_pylist(), texts.column(TEXT).to_pylist())
            if str(d) in quoted}


def build_view(plan: ReportPlan, selected: pa.Table, scored: pa.Table, centroids: np.ndarray, sizes: np.ndarray,
               rows: pa.Table, texts: Optional[pa.Table] = None) -> ReportView:
    """The bounded view the page renders, from the plan, the distributed pass's rows and the candidates'
    texts (``texts``: doc_id, text; the selection's own ``text`` column wins where it has one)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    k = len(sizes)
    if rows.num_rows:
        rows = rows.sort_by([(RAND_KEY, "ascending"), (DOC_ID, "ascending")])
    sample = rows.filter(pc.field("in_sample")) if rows.num_rows else rows
    docs = sample.slice(0, MAP_DOCS).select([DOC_ID, CLUSTER_ID, "x", "y"]) if rows.num_rows else _empty_points()
    where = {d: i for i, d in enumerate(rows.column(DOC_ID).to_pylist())} if rows.num_rows else {}
    text_of = _texts_of(plan, texts)
    if TEXT in selected.column_names:  # an example can be a selected document too
        text_of.update((d, t) for d, t in _texts_of(plan, selected.select([DOC_ID, TEXT])).items() if t)
    placed = [where[d] for d in (str(x) for x in plan.map_selected) if d in where]
    map_selected = (rows.take(pa.array(placed, pa.int64())).select([DOC_ID, CLUSTER_ID, "x", "y"])
                    if placed else _empty_points())
    return ReportView(
        centroids_xy=centroids_on_map(plan, centroids, sample),
        sizes=sizes,
        selected_per_cluster=_per_cluster(selected, k),
        scored_per_cluster=_per_cluster(_llm_scored(scored), k),
        docs=docs,
        map_selected=map_selected,
        shown_clusters=plan.shown_clusters,
        examples=_examples(plan, scored, text_of),
        quoted=_quoted(plan, selected, text_of),
        selected_columns=selected.column_names,
        uncertainty_scored=_finite(_column(scored, UNCERTAINTY)),
        uncertainty_selected=_finite(_column(selected, UNCERTAINTY)),
        n_selected=selected.num_rows,
        n_docs=int(sizes.sum()),
    )


def _empty_points() -> pa.Table:
    return pa.table({DOC_ID: pa.array([], pa.string()), CLUSTER_ID: pa.array([], pa.int64()),
                     "x": pa.array([], pa.float32()), "y": pa.array([], pa.float32())})


def _rows_for(table: pa.Table, ids: np.ndarray) -> list[dict]:
    if not len(ids):
        return []
    index = {d: i for i, d in enumerate(table.column(DOC_ID).to_pylist())}
    take = [index[d] for d in ids.tolist() if d in index]
    return table.take(pa.array(take, pa.int64())).to_pylist()


def _examples(plan: ReportPlan, scored: pa.Table, text_of: dict) -> dict[int, list[dict]]:
    keep = [c for c in (DOC_ID, CLUSTER_ID, DISTANCE) if c in scored.column_names]
    out: dict[int, list[dict]] = {}
    for row in _rows_for(scored.select(keep), plan.example_ids):
        row["text"] = text_of.get(str(row[DOC_ID]))
        out.setdefault(int(row[CLUSTER_ID]), []).append(row)
    return out


def _quoted(plan: ReportPlan, selected: pa.Table, text_of: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for row in _rows_for(selected, plan.quoted_selected):
        row["text"] = shorten(row.get(TEXT)) or text_of.get(str(row[DOC_ID]))
        out.setdefault(int(row[CLUSTER_ID]), []).append(row)
    return out


def gather_report_view(selected: pa.Table, scored: pa.Table, assigned, centroids: np.ndarray,
                       sizes: np.ndarray, seed: int = 0, texts: Optional[pa.Table] = None,
                       corpus_texts=None) -> ReportView:
    """Plan on the driver, one distributed pass over the assigned documents, then the bounded view.

    ``texts``: (doc_id, text) of the scored candidates when they carry text; ``corpus_texts``: a dataset of
    (doc_id, text) to read the quoted texts from otherwise (at most a few hundred rows come back).
    """
    from labelnext.pipelines.dataflow import collect

    plan = plan_report(selected, scored, centroids, sizes, seed)
    columns = [c for c in (DOC_ID, EMBEDDING, CLUSTER_ID, DISTANCE, RAND_KEY) if c in assigned.schema().names]
    rows = collect(assigned.select_columns(columns).map_batches(
        sample_rows,
        fn_kwargs={"mean": plan.mean, "basis": plan.basis, "cutoff": plan.sample_cutoff,
                   "wanted": plan.wanted()},  # a few thousand ids at most
        batch_format="numpy",
    ))
    if not rows.num_rows:
        rows = sample_rows({DOC_ID: np.empty(0, object), RAND_KEY: np.empty(0, np.int64),
                            CLUSTER_ID: np.empty(0, np.int64), EMBEDDING: np.zeros((0, len(plan.mean)))},
                           plan.mean, plan.basis, plan.sample_cutoff, plan.wanted())
    known = set(_texts_of(plan, texts)) | (set(selected.column(DOC_ID).to_pylist()) if TEXT in selected.column_names
                                          else set())
    missing = sorted(quoted_ids(plan) - known)
    if missing and corpus_texts is not None:
        fetched = collect(corpus_texts.select_columns([DOC_ID, TEXT]).map_batches(
            rows_with_ids, fn_kwargs={"ids": np.array(missing, dtype=object)}, batch_format="pyarrow"))
        if fetched.num_rows:
            texts = fetched if texts is None else pa.concat_tables([texts.select([DOC_ID, TEXT]),
                                                                    fetched.select([DOC_ID, TEXT])],
                                                                   promote_options="default")
    return build_view(plan, selected, scored, centroids, sizes, rows, texts)
