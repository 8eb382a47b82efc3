"""Resource-aware placement for the embed and score actor pools.

Pure functions over resource maps shaped like ``ray.cluster_resources()`` and ``ray.nodes()``, so every
decision is unit-testable without a cluster. The caller passes the maps in; nothing here talks to Ray.

GPU policy (per stage):

Keys live under ``resources.<stage>`` in the run config; messages name them with that prefix.

* ``device: auto`` uses GPUs when the stage asks for some (``num_gpus > 0``) and the cluster shows a ``GPU``
  resource, else CPU. The default ``num_gpus`` is a size for when GPUs are there, not an ask: only a
  ``num_gpus`` the config sets explicitly, on a cluster without GPUs, logs ONE warning line (for all stages).
* ``device: cuda`` is a requirement: with no ``GPU`` resource in the cluster, :class:`PlacementError` is
  raised before any work is scheduled (a nightly run on a GPU pool that failed to come up should fail loudly,
  not spend the night embedding 10M documents on CPU, and not hang waiting for GPUs that never arrive).
  On autoscaling clusters keep at least one GPU worker up (``min_workers >= 1``) so the resource is visible.
* ``device: cpu`` never requests GPUs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from labelnext.pipelines.config import ClusterResources, ResourcesConfig

log = logging.getLogger(__name__)

# CPUs kept free for the Ray Data read/filter tasks that feed an actor pool: a pool holding every CPU starves
# its own input and the run stalls (seen on a two-node CPU cluster).
DEFAULT_CPU_RESERVE = 1.0
_EPS = 1e-9


class PlacementError(ValueError):
    """The config cannot be placed on this cluster; the message names the config key to change."""


@dataclass(frozen=True)
class StagePlacement:
    """Ray resources for one actor pool. ``num_gpus`` is per actor and already includes tensor parallelism."""

    use_gpu: bool
    num_gpus: float
    num_cpus: float
    concurrency: int
    tensor_parallel_size: int = 1


@dataclass
class Placement:
    embed: StagePlacement
    score: StagePlacement
    # k-means training: on GPU when the local faiss build sees one, or when resources.cluster.use_gpu is auto
    # and the cluster has a GPU resource.
    cluster_use_gpu: bool = False
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Node:
    cpus: float
    gpus: float


def _nodes_from(resources: Mapping[str, Any], nodes: Optional[Sequence[Mapping[str, Any]]]) -> list[_Node]:
    """Alive nodes as (CPU, GPU); accepts ``ray.nodes()`` entries or bare per-node resource maps."""
    out: list[_Node] = []
    for node in nodes or ():
        if node.get("Alive", True) is False:
            continue
        res = node.get("Resources", node)
        out.append(_Node(float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))))
    if not out:
        out.append(_Node(float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))))
    return out


def _fmt(x: float) -> str:
    return f"{x:g}"


def _actors_per_node_gpu(node_gpus: float, per_actor: float) -> int:
    """How many actors needing ``per_actor`` GPUs fit on a node (fractions pack per physical GPU in Ray)."""
    if per_actor <= 0:
        return 0
    if per_actor < 1:
        return int(math.floor(node_gpus + _EPS)) * int(math.floor(1 / per_actor + _EPS))
    return int(math.floor(node_gpus / per_actor + _EPS))


def _fit_cpus(requested: float, nodes: list[_Node], key: str, notes: list[str]) -> float:
    largest = max(n.cpus for n in nodes)
    if largest > 0 and requested > largest + _EPS:
        notes.append(f"{key}={_fmt(requested)} is more than the largest node's {_fmt(largest)} CPUs: "
                     f"using {_fmt(largest)}")
        return largest
    return requested


def _whole_gpus(per_actor: float, key: str, notes: list[str]) -> float:
    # Ray only accepts fractional GPU requests below 1; above 1 they must be whole numbers.
    if per_actor > 1 and abs(per_actor - round(per_actor)) > _EPS:
        whole = float(math.ceil(per_actor))
        notes.append(f"{key}={_fmt(per_actor)} GPUs per actor is not a whole number: using {_fmt(whole)}")
        return whole
    return per_actor


def _wants_gpu(device: str, num_gpus: float) -> bool:
    return device == "cuda" or (device == "auto" and num_gpus > 0)


def _keep_reserve(fit: int, nodes: list[_Node], num_cpus: float, reserve: float) -> int:
    """Drop actors until at least ``reserve`` CPUs stay free in the cluster (never below one actor)."""
    total = sum(n.cpus for n in nodes)
    while fit > 1 and total - fit * num_cpus < reserve - _EPS:
        fit -= 1
    return fit


def _cpu_pool(nodes: list[_Node], num_cpus: float, reserve: float) -> int:
    fit = sum(int(math.floor(n.cpus / num_cpus + _EPS)) for n in nodes)
    return max(1, _keep_reserve(fit, nodes, num_cpus, reserve))


def _gpu_pool(nodes: list[_Node], per_actor_gpus: float, num_cpus: float, reserve: float) -> int:
    fit = 0
    for n in nodes:
        by_gpu = _actors_per_node_gpu(n.gpus, per_actor_gpus)
        by_cpu = int(math.floor(n.cpus / num_cpus + _EPS)) if num_cpus > 0 else by_gpu
        fit += min(by_gpu, by_cpu)
    return _keep_reserve(fit, nodes, num_cpus, reserve)


def _place_stage(
    name: str,
    *,
    device: str,
    num_gpus: float,
    num_cpus: float,
    concurrency: Optional[int],
    tensor_parallel_size: int,
    nodes: list[_Node],
    cluster_gpus: float,
    cpu_reserve: float,
    explicit_gpus: bool,
    notes: list[str],
    warnings: list[str],
    fallbacks: list[str],
) -> StagePlacement:
    cpus = _fit_cpus(num_cpus, nodes, f"{name}.num_cpus", notes)
    use_gpu = _wants_gpu(device, num_gpus) and cluster_gpus > 0
    if _wants_gpu(device, num_gpus) and not use_gpu:
        if device == "cuda":
            raise PlacementError(
                f"{name}.device is 'cuda' but the Ray cluster has no GPU resource; start GPU workers, or run on "
                f"CPU with --set {name}.device=auto (or cpu)")
        if explicit_gpus:
            fallbacks.append(f"{name} (num_gpus={_fmt(num_gpus)})")

    if not use_gpu:
        if tensor_parallel_size > 1:
            notes.append(f"{name}: tensor_parallel_size={tensor_parallel_size} ignored on CPU")
        fit = _cpu_pool(nodes, cpus, cpu_reserve)
        pool = concurrency or fit
        how = "pinned by config" if concurrency else f"{_fmt(sum(n.cpus for n in nodes))} CPUs"
        if concurrency and concurrency > fit:
            warnings.append(f"{name}.concurrency={concurrency} x {_fmt(cpus)} CPU leaves less than "
                            f"{_fmt(cpu_reserve)} of the cluster's {_fmt(sum(n.cpus for n in nodes))} CPUs free for "
                            "the tasks that feed the pool: the run can stall unless the cluster grows; leave it "
                            f"unset to derive {fit}")
        notes.append(f"{name}: CPU, {pool} actors x {_fmt(cpus)} CPU ({how})")
        return StagePlacement(False, 0.0, cpus, pool, 1)

    base = num_gpus if num_gpus > 0 else 1.0
    if num_gpus <= 0:
        notes.append(f"{name}.device=cuda with num_gpus=0: using 1 GPU per actor")
    per_actor = _whole_gpus(base * tensor_parallel_size, f"{name}.num_gpus x tensor_parallel_size", notes)
    largest_gpu = max(n.gpus for n in nodes)
    if per_actor > largest_gpu + _EPS:
        raise PlacementError(
            f"{name} needs {_fmt(per_actor)} GPUs per actor (num_gpus={_fmt(base)} x tensor_parallel_size="
            f"{tensor_parallel_size}) but the largest node has {_fmt(largest_gpu)}; lower {name}.num_gpus or "
            f"{name}.tensor_parallel_size")
    fit = _gpu_pool(nodes, per_actor, cpus, cpu_reserve)
    if concurrency:
        pool = concurrency
        if concurrency > fit:
            notes.append(f"{name}: concurrency={concurrency} pinned above the {fit} actors that fit now; "
                         "actors beyond that wait for the autoscaler")
        how = "pinned by config"
    else:
        if fit < 1:
            raise PlacementError(
                f"{name}: no node has {_fmt(per_actor)} GPUs and {_fmt(cpus)} CPUs free for one actor; lower "
                f"{name}.num_cpus")
        pool = fit
        how = f"{_fmt(cluster_gpus)} GPUs"
    tp = f", tensor_parallel_size={tensor_parallel_size}" if tensor_parallel_size > 1 else ""
    notes.append(f"{name}: GPU, {pool} actors x {_fmt(per_actor)} GPU + {_fmt(cpus)} CPU{tp} ({how})")
    return StagePlacement(True, per_actor, cpus, pool, tensor_parallel_size)


def plan_placement(
    resources: Mapping[str, Any],
    cfg: ResourcesConfig,
    *,
    nodes: Optional[Sequence[Mapping[str, Any]]] = None,
    cpu_reserve: float = DEFAULT_CPU_RESERVE,
) -> Placement:
    """Decide GPU use, per-actor resources and pool sizes for embed and score.

    ``resources`` is ``ray.cluster_resources()``; ``nodes`` (``ray.nodes()``) refines the fit per node and
    caps per-actor CPUs at the largest node. Without ``nodes`` the cluster is treated as one node.
    """
    node_list = _nodes_from(resources, nodes)
    cluster_gpus = float(resources.get("GPU", 0.0))
    notes: list[str] = []
    warnings: list[str] = []
    fallbacks: list[str] = []
    common = dict(nodes=node_list, cluster_gpus=cluster_gpus, cpu_reserve=cpu_reserve, notes=notes,
                  warnings=warnings, fallbacks=fallbacks)
    e, sc = cfg.embed, cfg.score
    embed = _place_stage("resources.embed", device=e.device, num_gpus=e.num_gpus, num_cpus=e.num_cpus,
                         concurrency=e.concurrency, tensor_parallel_size=1,
                         explicit_gpus="num_gpus" in e.model_fields_set, **common)
    score = _place_stage("resources.score", device=sc.device, num_gpus=sc.num_gpus, num_cpus=sc.num_cpus,
                         concurrency=sc.concurrency, tensor_parallel_size=sc.tensor_parallel_size,
                         explicit_gpus="num_gpus" in sc.model_fields_set, **common)
    if fallbacks:
        # One line for both stages: the reader needs to learn once that the run is on CPU.
        warnings.insert(0, f"config asks for GPUs for {' and '.join(fallbacks)} but the Ray cluster has no GPU "
                           "resource: running on CPU (set device: cpu to silence this)")
    for message in warnings:
        log.warning(message)
    cluster_use_gpu = faiss_use_gpu(cfg.cluster) or (cfg.cluster.use_gpu == "auto" and cluster_gpus > 0)
    return Placement(embed=embed, score=score, cluster_use_gpu=cluster_use_gpu, notes=notes, warnings=warnings)


def faiss_use_gpu(cluster_cfg: ClusterResources) -> bool:
    """True when ``resources.cluster.use_gpu`` is auto and the local faiss build sees a GPU."""
    if cluster_cfg.use_gpu != "auto":
        return False
    try:
        import faiss
    except ImportError:
        return False
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    if get_num_gpus is None:
        return False
    try:
        return int(get_num_gpus()) > 0
    except Exception:  # a GPU build without a usable driver raises here; treat it as no GPU
        return False
