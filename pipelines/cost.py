"""Cost telemetry: per-stage reserved resources priced in dollars, and the counterfactuals.

Reserved seconds are wall seconds times the resources the stage held (actors x CPUs/GPUs per actor),
which is what a cluster bill charges, not the busy fraction.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from labelnext.pipelines.config import CostConfig

log = logging.getLogger("labelnext")

STAGES = ("read", "embed", "cluster", "score", "select", "write")


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

    def usd(self, prices: CostConfig) -> float:
        return self.cpu_s() / 3600 * prices.cpu_hour_usd + self.accelerator_s() / 3600 * prices.gpu_hour_usd

    def to_dict(self, prices: CostConfig) -> dict[str, Any]:
        out: dict[str, Any] = {
            "wall_s": round(self.wall_s, 3),
            "docs": int(self.docs),
            "cpu_s": round(self.cpu_s(), 3),
            "accelerator_s": round(self.accelerator_s(), 3),
            "usd": self.usd(prices),
        }
        if self.tokens is not None:
            out["tokens"] = int(self.tokens)
        out.update(self.extra)
        return out


class CostLedger:
    """Collects stage costs as the run goes."""

    def __init__(self, prices: CostConfig):
        self.prices = prices
        self.stages: dict[str, StageCost] = {name: StageCost() for name in STAGES}

    @contextmanager
    def stage(self, name: str, *, cpus: float = 1.0, gpus: float = 0.0) -> Iterator[StageCost]:
        stage = self.stages[name]
        stage.cpus, stage.gpus = cpus, gpus
        log.info("%s: started", name)
        start = time.perf_counter()
        try:
            yield stage
        finally:
            stage.wall_s += time.perf_counter() - start

    def total_usd(self) -> float:
        return sum(s.usd(self.prices) for s in self.stages.values())


def full_pass_usd(corpus_tokens: float, score: StageCost, prices: CostConfig) -> float:
    """The scoring model over every document, on the same pool at the throughput measured in this run.

    The pool's busy seconds (``score.extra['busy_s']``, summed over actors) give its token throughput; the
    rest of the stage's wall time (model load, start-up) is paid once, as it would be for a full pass.
    """
    tokens = score.tokens or 0
    if tokens <= 0 or score.wall_s <= 0:
        return float("nan")
    actors = max(1, int(score.extra.get("actors", 1)))
    busy = float(score.extra.get("busy_s") or 0.0) / actors
    if busy <= 0:
        busy = score.wall_s
    overhead = max(0.0, score.wall_s - busy)
    wall = overhead + corpus_tokens * busy / tokens
    return score.usd(prices) / score.wall_s * wall


def build_report(
    ledger: CostLedger,
    *,
    budget: int,
    accepted_docs: int,
    corpus_tokens_estimate: float,
    scoring_model_params: Optional[float],
    hardware: dict[str, Any],
) -> dict[str, Any]:
    prices = ledger.prices
    score = ledger.stages["score"]
    scored_tokens = score.tokens or 0
    full_small = full_pass_usd(corpus_tokens_estimate, score, prices)
    scale = prices.reference_params / scoring_model_params if scoring_model_params else float("nan")
    full_big = full_small * scale
    total = ledger.total_usd()
    savings = full_small / total if total > 0 and math.isfinite(full_small) else float("nan")
    return {
        "stages": {name: s.to_dict(prices) for name, s in ledger.stages.items()},
        "total_usd": total,
        "total_wall_s": round(sum(s.wall_s for s in ledger.stages.values()), 3),
        "prices": prices.model_dump(),
        "corpus": {
            "accepted_docs": accepted_docs,
            "estimated_tokens": corpus_tokens_estimate,
            "scored_docs": score.docs,
            "scored_tokens": scored_tokens,
            "scored_fraction": (score.docs / accepted_docs) if accepted_docs else 0.0,
        },
        "counterfactuals": {
            "full_pass_scoring_model_usd": full_small,
            "full_pass_70b_usd": full_big,
            "annotation_usd": budget * prices.label_usd,
            "scoring_model_params": scoring_model_params,
            "reference_params": prices.reference_params,
        },
        "savings_ratio": savings,
        "hardware": hardware,
        "headline": headline(savings, total, full_small, score.docs, accepted_docs),
    }


def headline(savings: float, total: float, full_small: float, scored: int, accepted: int) -> str:
    if not math.isfinite(savings):
        return f"This run cost ${total:.4f}; no LLM scoring happened, so there is no full-pass comparison."
    return (
        f"labelnext scored {scored:,} of {accepted:,} documents with the LLM and cost ${total:.4f}, "
        f"{savings:.1f}x less than scoring every document (${full_small:.4f})."
    )
