"""Selection invariants on random inputs (hypothesis): read/validate -> dedup -> exclude -> candidates ->
select, exactly as the pipeline chains them, without Ray.

For any corpus, budget and rule: selected ids are unique, there are exactly min(budget, available) of them,
each is an accepted input id, and no excluded id or id that was only ever rejected is selected. The
selection does not depend on the order rows (or blocks) arrive in.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labelnext.ops.cluster import candidates as cand
from labelnext.ops.io import read as rd
from labelnext.ops.cluster.kmeans import CLUSTER_ID, DISTANCE, RAND_KEY, rand_keys
from labelnext.ops.select.selector import SELECTED_COLUMNS, Selector
from labelnext.pipelines.config import CandidatesConfig, InputConfig, SelectConfig

RULES = ["typical_uncertain", "baseline", "uncertainty_weighted", "round_robin", "entropy_only", "cluster_only",
         "stratified"]
TEXTS = [None, "", "  \t", "plain text", "another document", "x", b"\xff\xfe not utf-8", "caf\u00e9"]
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

select_configs = st.builds(
    SelectConfig,
    rule=st.sampled_from(RULES),
    score=st.sampled_from(["mean_entropy", "nll", "max_entropy"]),
    entropy_cap_quantile=st.none() | st.floats(0.05, 1.0),
    dedup_threshold=st.floats(0.5, 1.0),
    quota=st.sampled_from(["size", "cover"]),
    seed=st.integers(0, 3),
)


def _scores(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Scores with ties (few distinct values) and NaNs (documents without tokens)."""
    out = {}
    for name in ("uncertainty", "nll", "max_entropy"):
        values = rng.choice([0.5, 1.0, 1.0, 2.5, np.nan], size=n) if rng.random() < 0.5 else rng.random(n) * 4
        out[name] = values.astype(np.float64)
    out["n_tokens"] = rng.integers(0, 60, n)
    return out


def _embeddings(rng: np.random.Generator, n: int, dim: int = 6) -> pa.Array:
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    if n > 1:  # plant near-duplicates
        copies = rng.integers(0, n, size=n // 3)
        emb[copies] = emb[rng.integers(0, n)]
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-6)
    return pa.array(emb.tolist(), pa.list_(pa.float32()))


@st.composite
def candidate_tables(draw):
    n = draw(st.integers(0, 40))
    k = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    clusters = rng.integers(0, k, n).astype(np.int32)
    table = pa.table({
        "doc_id": [f"d{i}" for i in range(n)],
        CLUSTER_ID: clusters,
        DISTANCE: rng.choice([0.1, 0.2, 0.2, 0.7], size=n).astype(np.float32),
        RAND_KEY: rng.permutation(2**20)[:n].astype(np.int64),  # unique, as hashes of unique ids are
        **_scores(rng, n),
        "embedding": _embeddings(rng, n),
    })
    sizes = np.bincount(clusters, minlength=k) + rng.integers(0, 20, k)  # clusters hold more than their candidates
    return table, sizes, rng


def check_selection(out: pa.Table, candidates: pa.Table, budget: int) -> list[str]:
    ids = out.column("doc_id").to_pylist()
    assert out.column_names == list(SELECTED_COLUMNS)
    assert len(ids) == max(0, min(budget, candidates.num_rows))
    assert len(set(ids)) == len(ids)
    assert set(ids) <= set(candidates.column("doc_id").to_pylist())
    assert out.column("rank").to_pylist() == list(range(1, len(ids) + 1))
    assert None not in out.column("reason").to_pylist()
    cluster_of = dict(zip(candidates.column("doc_id").to_pylist(), candidates.column(CLUSTER_ID).to_pylist()))
    assert out.column("cluster_id").to_pylist() == [cluster_of[i] for i in ids]
    return ids


@PROPS
@given(data=candidate_tables(), budget=st.integers(-3, 90), cfg=select_configs)
def test_selector_invariants_and_row_order_independence(data, budget, cfg):
    table, sizes, rng = data
    ids = check_selection(Selector(cfg).select(table, sizes, budget), table, budget)
    shuffled = table.take(pa.array(rng.permutation(table.num_rows), pa.int64()))
    assert Selector(cfg).select(shuffled, sizes, budget).column("doc_id").to_pylist() == ids


# -- the whole driver-side chain ---------------------------------------------------------------------------

def _corpus_column(values: list) -> pa.Array:
    """A Parquet-style string column; bytes entries become invalid UTF-8 inside it."""
    raw = [v if isinstance(v, (bytes, type(None))) else v.encode("utf-8") for v in values]
    return pa.array(raw, pa.binary()).view(pa.string())


@st.composite
def corpora(draw):
    n = draw(st.integers(0, 50))
    ids = draw(st.lists(st.none() | st.integers(0, 30).map(lambda i: f"d{i}") | st.just(" "), min_size=n, max_size=n))
    texts = draw(st.lists(st.sampled_from(TEXTS), min_size=n, max_size=n))
    excluded = draw(st.sets(st.integers(0, 30).map(lambda i: f"d{i}"), max_size=8))
    n_blocks = draw(st.integers(1, 4))
    return ids, texts, sorted(excluded), n_blocks


def _validate(ids: list, texts: list) -> pa.Table:
    """read.validate_table over the corpus, split into two files, then duplicates marked (keep the first)."""
    half = len(ids) // 2
    parts = [
        rd.validate_table(pa.table({"id": _corpus_column(ids[a:b]), "text": _corpus_column(texts[a:b])}),
                          InputConfig(), file_index, 0)
        for file_index, (a, b) in enumerate([(0, half), (half, len(ids))])
    ]
    table = pa.concat_tables(parts)
    ok = pa.compute.is_null(table.column(rd.REASON))
    valid = table.filter(ok)
    dups = rd.exact_duplicates(valid.select(["doc_id", rd.ORDER])) if valid.num_rows else set()
    reasons = table.column(rd.REASON).to_pylist()
    orders = table.column(rd.ORDER).to_pylist()
    reasons = [rd.REJECT_DUPLICATE if (r is None and o in dups) else r for r, o in zip(reasons, orders)]
    return table.set_column(table.schema.get_field_index(rd.REASON), rd.REASON, pa.array(reasons, pa.string()))


@PROPS
@given(corpus=corpora(), budget=st.integers(1, 30), k=st.integers(1, 5), factor=st.floats(1.0, 4.0),
       diverse=st.floats(0.0, 1.0), cfg=select_configs, seed=st.integers(0, 2**32 - 1))
def test_chain_never_selects_rejected_or_excluded_ids(corpus, budget, k, factor, diverse, cfg, seed):
    ids, texts, excluded, n_blocks = corpus
    rng = np.random.default_rng(seed)
    validated = _validate(ids, texts)
    accepted = validated.filter(pa.compute.is_null(validated.column(rd.REASON)))
    excluded_hashes = np.sort(rd.id_hash(excluded))
    keep = ~np.isin(accepted.column(rd.ID_HASH).to_numpy(), excluded_hashes)
    available = accepted.filter(pa.array(keep))

    # Every accepted id is unique: duplicates were rejected, keeping the first occurrence.
    avail_ids = available.column("doc_id").to_pylist()
    assert len(set(avail_ids)) == len(avail_ids)
    first_seen = {}
    for doc_id, reason, order in zip(validated.column("doc_id").to_pylist(), validated.column(rd.REASON).to_pylist(),
                                     validated.column(rd.ORDER).to_pylist()):
        if reason in (None, rd.REJECT_DUPLICATE):
            first_seen.setdefault(doc_id, (order, reason))
    assert all(reason is None for _, reason in first_seen.values())

    # Assign clusters as the Assigner does, then candidates block by block as Ray Data would.
    n = available.num_rows
    assigned = available.select(["doc_id"]).append_column(CLUSTER_ID, pa.array(rng.integers(0, k, n).astype(np.int32)))
    assigned = assigned.append_column(DISTANCE, pa.array(rng.random(n).astype(np.float32)))
    assigned = assigned.append_column(RAND_KEY, pa.array(rand_keys(avail_ids, cfg.seed)))
    sizes = np.bincount(assigned.column(CLUSTER_ID).to_numpy(), minlength=k)
    plan = cand.plan_candidates(sizes, budget, CandidatesConfig(factor=factor, diverse_fraction=diverse))
    cuts = np.sort(rng.integers(0, n + 1, n_blocks - 1))
    blocks = [assigned.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, n])]
    partial = pa.concat_tables([cand.block_candidates(b, plan) for b in blocks])
    candidates = cand.merge_candidates(partial, plan)
    assert candidates.num_rows == min(math.ceil(factor * budget), n)
    assert len(set(candidates.column("doc_id").to_pylist())) == candidates.num_rows

    m = candidates.num_rows
    scored = candidates
    for name, values in _scores(rng, m).items():
        scored = scored.append_column(name, pa.array(values))
    scored = scored.append_column("embedding", _embeddings(rng, m))
    chosen = check_selection(Selector(cfg).select(scored, sizes, budget), scored, budget)

    assert len(chosen) == min(budget, n)
    assert not set(chosen) & set(excluded)
    only_rejected = set(validated.column("doc_id").to_pylist()) - set(accepted.column("doc_id").to_pylist())
    assert not set(chosen) & only_rejected
    assert set(chosen) <= set(i for i in ids if i is not None)
