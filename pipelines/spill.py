"""Object spilling: where a local Ray spills and how big its object store is (``ray.spill_dir``,
``ray.object_store_memory``), and the preflight that stops a run whose vectors cannot fit before any compute
(local Ray only: a joined cluster spills to its nodes' disks, configured where the cluster starts).

The corpus's vectors are the run's one corpus-sized payload: ``rows x dim x 4`` bytes, held ``ray.spill_headroom``
times at the peak (the embed output and the cluster assignment overlap). What the object store cannot hold Ray
spills to disk, so the store and the spill directory's free disk together must hold it; otherwise the run
would fail hours in, when the disk fills.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from labelnext.pipelines.config import RayConfig

FLOAT32_BYTES = 4
log = logging.getLogger(__name__)


class SpillError(ValueError):
    """The run's vectors do not fit the object store and the spill disk; the message names the settings."""


def init_kwargs(cfg: RayConfig) -> dict[str, Any]:
    """``ray.init`` arguments for a local Ray that labelnext starts (a joined cluster keeps its own)."""
    kwargs: dict[str, Any] = {}
    if cfg.spill_dir:
        os.makedirs(cfg.spill_dir, exist_ok=True)
        kwargs["object_spilling_directory"] = cfg.spill_dir
    if cfg.object_store_memory:
        kwargs["object_store_memory"] = cfg.object_store_memory
    return kwargs


def spill_dir(cfg: RayConfig) -> str:
    """The directory a local Ray spills to: ``ray.spill_dir``, else Ray's temporary directory."""
    return cfg.spill_dir or os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()


@dataclass(frozen=True)
class SpillPlan:
    rows: int
    dim: int
    headroom: float
    store_bytes: int
    spill_dir: str
    free_bytes: int

    @property
    def vector_bytes(self) -> int:
        return self.rows * self.dim * FLOAT32_BYTES

    @property
    def needed_bytes(self) -> int:
        return int(self.vector_bytes * self.headroom)

    def problem(self) -> Optional[str]:
        """One line naming the setting and the numbers when the vectors cannot fit, else None."""
        need = self.needed_bytes
        if need <= self.store_bytes:
            return None
        if need <= self.store_bytes + self.free_bytes:
            return None
        return (f"ray.spill_dir: {self.spill_dir} has {_gib(self.free_bytes)} free and the object store "
                f"(ray.object_store_memory) {_gib(self.store_bytes)}, but the run's vectors need about "
                f"{_gib(need)} ({self._sum()}): point ray.spill_dir at a larger disk or raise ray.object_store_memory")

    def _sum(self) -> str:
        return f"{self.rows:,} rows x {self.dim} dims x 4 bytes x {self.headroom:g} headroom"


def starts_local_ray(cfg: RayConfig) -> bool:
    return not (cfg.address or os.environ.get("RAY_ADDRESS"))


def plan(cfg: RayConfig, rows: int, dim: Optional[int]) -> SpillPlan:
    """The preflight's figures: the object store from the running Ray, the spill disk from the local filesystem."""
    import ray

    store = int(ray.cluster_resources().get("object_store_memory", 0))
    where = spill_dir(cfg)
    free = shutil.disk_usage(where).free
    return SpillPlan(rows=rows, dim=dim or cfg.assumed_dim, headroom=cfg.spill_headroom, store_bytes=store,
                     spill_dir=where, free_bytes=free)


def preflight(cfg: RayConfig, rows: int, dim: Optional[int]) -> Optional[SpillPlan]:
    """Stop with :class:`SpillError` when the run's vectors cannot fit; call it before any compute.

    Only for a local Ray: a joined cluster spills on its nodes' disks, which the driver cannot see, and its
    object store is the cluster's to size. None there."""
    if not starts_local_ray(cfg):
        return None
    figures = plan(cfg, rows, dim)
    problem = figures.problem()
    if problem:
        raise SpillError(problem)
    log.info("spill: the vectors need about %s; object store %s, %s free in %s", _gib(figures.needed_bytes),
             _gib(figures.store_bytes), _gib(figures.free_bytes), figures.spill_dir)
    return figures


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"
