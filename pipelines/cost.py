"""Cost telemetry: what each stage reserved, what the cluster held, and the full-pass counterfactuals.

Two views of the same run, both in the report:

* reserved (per stage): wall seconds x the CPUs/GPUs the stage reserved (actors x per-actor resources), priced
  at ``cost.cpu_hour_usd`` / ``cost.gpu_hour_usd``. It shows where the money goes.
* held (the bill): every node's CPUs and GPUs x the run's wall time, because a cluster bills what it holds,
  idle or not. The headline and ``savings_ratio`` use this view.

Counterfactuals for the same corpus: the scoring model over every document (its throughput measured from the
score actors' busy time, the corpus token count estimated from a seeded random sample of documents), a
reference-size model over every document (2 x params FLOPs per token at a stated MFU on the priced GPU), and
the annotation bill. The assumptions behind each figure are written into the report.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import pyarrow as pa

from labelnext.ops.cluster.kmeans import rand_keys
from labelnext.ops.core.columns import DOC_ID, TEXT
from labelnext.pipelines.config import CostConfig

log = logging.getLogger("labelnext")

STAGES = ("read", "embed", "cluster", "score", "select", "write")
_TOKEN_SAMPLE_SALT = 104729  # apart from the k-means sample and the candidates' random share


@dataclass
class StageCost:
    wall_s: float = 0.0
    docs: int = 0
    tokens: Optional[int] = None
    cpus: float = 1.0  # CPUs reserved while the stage ran
    gpus: float = 0.0  # GPUs reserved while the stage ran
    extra: dict[str, Any] = field(default_factory=dict)

    def cpu_s(self) -> float:
        return self.wall_s * self.cpus

    def accelerator_s(self) -> float:
        return self.wall_s * self.gpus

    def usd_per_s(self, prices: CostConfig) -> float:
        return (self.cpus * prices.cpu_hour_usd + self.gpus * prices.gpu_hour_usd) / 3600

    def usd(self, prices: CostConfig) -> float:
        return self.wall_s * self.usd_per_s(prices)

    def to_dict(self, prices: CostConfig) -> dict[str, Any]:
        out: dict[str, Any] = {
            "wall_s": self.wall_s,
            "docs": int(self.docs),
            "cpus": self.cpus,
            "gpus": self.gpus,
            "cpu_s": self.cpu_s(),
            "accelerator_s": self.accelerator_s(),
            "usd": self.usd(prices),
        }
        if self.tokens is not None:
            out["tokens"] = int(self.tokens)
        out.update(self.extra)
        return out


@dataclass
class Held:
    """What the cluster held for the run: the most CPUs, GPUs and nodes seen, for the run's wall time."""

    cpus: float = 0.0
    gpus: float = 0.0
    nodes: int = 0

    def see(self, resources: Mapping[str, float], nodes: int) -> None:
        self.cpus = max(self.cpus, float(resources.get("CPU", 0.0)))
        self.gpus = max(self.gpus, float(resources.get("GPU", 0.0)))
        self.nodes = max(self.nodes, nodes)

    def to_dict(self, wall_s: float, prices: CostConfig) -> dict[str, Any]:
        return {
            "wall_s": wall_s,
            "nodes": self.nodes,
            "cpus": self.cpus,
            "gpus": self.gpus,
            "cpu_s": wall_s * self.cpus,
            "accelerator_s": wall_s * self.gpus,
            "usd": wall_s * (self.cpus * prices.cpu_hour_usd + self.gpus * prices.gpu_hour_usd) / 3600,
            "basis": "every node's CPUs and GPUs for the run's wall time (what a cluster bills)",
        }


class CostLedger:
    """Collects stage costs as the run goes; the run's wall clock starts when the ledger is made."""

    def __init__(self, prices: CostConfig):
        self.prices = prices
        self.stages: dict[str, StageCost] = {name: StageCost() for name in STAGES}
        self.held = Held()
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str, *, cpus: float = 1.0, gpus: float = 0.0, what: Optional[str] = None
              ) -> Iterator[StageCost]:
        """Time (and price) work under stage ``name``; ``what`` names it in the log when it is not the stage itself."""
        stage = self.stages[name]
        stage.cpus, stage.gpus = cpus, gpus
        log.info("%s: started", what or name)
        start = time.perf_counter()
        try:
            yield stage
        finally:
            stage.wall_s += time.perf_counter() - start

    def wall_s(self) -> float:
        return time.perf_counter() - self._start

    def reserved_usd(self) -> float:
        return sum(s.usd(self.prices) for s in self.stages.values())


# -- the corpus token estimate: a seeded random sample of documents --------------------------------------------
def _sample_rows(batch: dict[str, np.ndarray], seed: int, cutoff: int) -> dict[str, np.ndarray]:
    keys = rand_keys([str(d) for d in batch[DOC_ID]], seed)
    keep = keys < cutoff
    return {TEXT: batch[TEXT][keep], "_key": keys[keep]}


def sample_texts(ds, n: int, size: int, seed: int) -> list[str]:
    """``size`` texts drawn uniformly at random from ``ds`` (``n`` rows), chosen by a seeded hash of doc_id, so
    the sample does not depend on block order and is not the corpus's first rows. Only the sample (about twice
    ``size`` rows) reaches the driver."""
    from labelnext.pipelines.dataflow import collect

    salt = seed + _TOKEN_SAMPLE_SALT
    cutoff = int(min(1.0, 2.0 * size / max(n, 1)) * 2**53)  # rand_keys are 53-bit
    rows = collect(ds.select_columns([DOC_ID, TEXT]).map_batches(
        _sample_rows, fn_kwargs={"seed": salt, "cutoff": cutoff}, batch_format="numpy"))
    if rows.num_rows == 0:
        return []
    order = np.argsort(np.asarray(rows.column("_key")), kind="stable")[:size]
    return [str(t) for t in rows.column(TEXT).take(pa.array(order)).to_pylist()]


# -- counterfactuals ----------------------------------------------------------------------------------------
def scoring_throughput(score: StageCost) -> tuple[float, float]:
    """(pool tokens/s, start-up seconds) of the score stage, from the actors' busy time.

    ``busy_by_actor`` ({actor: (tokens, busy seconds)}) gives each actor's own rate, summed over the pool;
    without it, ``busy_s`` (summed over the actors) and ``actors`` assume equal actors. Both come from the
    scored rows after repeated rows were dropped, so a retried batch counts once. The rest of the stage's
    wall time (model load, start-up) is paid once, as it would be for a full pass.
    """
    tokens = score.tokens or 0
    busy = float(score.extra.get("busy_s") or 0.0)
    actors = max(1, int(score.extra.get("actors", 1)))
    if tokens <= 0 or score.wall_s <= 0:
        return float("nan"), float("nan")
    per_actor = [(float(t), float(b)) for t, b in (score.extra.get("busy_by_actor") or {}).values() if b > 0]
    if per_actor:  # {actor: (tokens, busy_s)}: each actor's own rate, summed over the pool
        return sum(t / b for t, b in per_actor), max(0.0, score.wall_s - max(b for _, b in per_actor))
    if busy <= 0:  # no instrumentation: the stage's whole wall time was work
        return tokens / score.wall_s, 0.0
    return actors * tokens / busy, max(0.0, score.wall_s - busy / actors)


def full_pass_usd(corpus_tokens: float, score: StageCost, prices: CostConfig) -> float:
    """The scoring model over every document, on the pool this run reserved, at its measured throughput."""
    tokens_per_s, startup_s = scoring_throughput(score)
    if not math.isfinite(tokens_per_s):
        return float("nan")
    return (startup_s + corpus_tokens / tokens_per_s) * score.usd_per_s(prices)


def reference_model_usd(corpus_tokens: float, prices: CostConfig) -> float:
    """A ``reference_params`` model over every document: 2 x params FLOPs per token (prefill) at
    ``reference_mfu`` of ``reference_gpu_tflops``, priced at ``gpu_hour_usd``."""
    gpu_s = corpus_tokens * 2 * prices.reference_params / (prices.reference_gpu_tflops * 1e12 * prices.reference_mfu)
    return gpu_s / 3600 * prices.gpu_hour_usd


def build_report(
    ledger: CostLedger,
    *,
    budget: int,
    accepted_docs: int,
    corpus_tokens_estimate: float,
    token_sample_docs: int,
    scoring_model_params: Optional[float],
    hardware: dict[str, Any],
) -> dict[str, Any]:
    prices = ledger.prices
    score = ledger.stages["score"]
    wall = ledger.wall_s()
    held = ledger.held.to_dict(wall, prices)
    reserved = ledger.reserved_usd()
    total = held["usd"]
    full_small = full_pass_usd(corpus_tokens_estimate, score, prices)
    full_big = reference_model_usd(corpus_tokens_estimate, prices)
    tokens_per_s, _ = scoring_throughput(score)
    savings = full_small / total if total > 0 and math.isfinite(full_small) else float("nan")
    return {
        "stages": {name: s.to_dict(prices) for name, s in ledger.stages.items()},
        "reserved_usd": reserved,
        "held": held,
        "total_usd": total,
        "total_wall_s": wall,
        "prices": prices.model_dump(),
        "corpus": {
            "accepted_docs": accepted_docs,
            "estimated_tokens": corpus_tokens_estimate,
            "token_sample_docs": token_sample_docs,
            "scored_docs": score.docs,
            "scored_tokens": score.tokens or 0,
            "scored_fraction": (score.docs / accepted_docs) if accepted_docs else 0.0,
        },
        "counterfactuals": {
            "full_pass_scoring_model_usd": full_small,
            "full_pass_70b_usd": full_big,
            "annotation_usd": budget * prices.label_usd,
            "scoring_tokens_per_s": tokens_per_s,
            "scoring_model_params": scoring_model_params,
            "reference_params": prices.reference_params,
            "assumptions": assumptions(prices, accepted_docs, token_sample_docs, score),
        },
        "savings_ratio": savings,
        "hardware": hardware,
        "headline": headline(savings, total, full_small, full_big, score.docs, accepted_docs),
    }


def assumptions(prices: CostConfig, accepted: int, sample: int, score: StageCost) -> dict[str, str]:
    return {
        "this_run": "total_usd is what the cluster held: every node's CPUs and GPUs for the run's wall time; "
                    "stages[*].usd is what each stage reserved (wall x reserved CPUs/GPUs x price)",
        "corpus_tokens": f"mean predicted tokens of {sample} documents drawn at random (seeded by doc_id) "
                         f"x {accepted:,} accepted documents",
        "full_pass_scoring_model": f"the score stage's pool ({score.extra.get('actors', 1)} actors, "
                                   f"{score.cpus:g} CPUs, {score.gpus:g} GPUs) at the throughput its actors "
                                   "measured while busy, plus its start-up once",
        "full_pass_70b": f"{prices.reference_params:.3g} parameters, 2 FLOPs per parameter per token (prefill), "
                         f"at {prices.reference_mfu:.0%} MFU of {prices.reference_gpu_tflops:g} TFLOP/s per GPU, "
                         f"${prices.gpu_hour_usd:g} per GPU-hour",
        "annotation": f"${prices.label_usd:g} per label",
    }


def headline(savings: float, total: float, full_small: float, full_big: float, scored: int, accepted: int) -> str:
    if not math.isfinite(savings):
        # The selection rule did not need the LLM (a cold start picks cluster representatives): the
        # scoring model's throughput was not measured, but the 70B-class pass is priced from FLOPs alone.
        if math.isfinite(full_big) and full_big > 0 and total > 0:
            return (f"No document went through the LLM; this run cost ${total:.4f}, "
                    f"{full_big / total:,.1f}x less than a 70B-class model over every document (${full_big:.4f}).")
        return f"This run cost ${total:.4f}; no document went through the LLM."
    return (
        f"labelnext scored {scored:,} of {accepted:,} documents with the LLM and cost ${total:.4f} (all the "
        f"cluster held for the run), {savings:.1f}x less than scoring every document (${full_small:.4f})."
    )
