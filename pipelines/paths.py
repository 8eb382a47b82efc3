"""Local paths on a multi-host cluster: refuse them before any compute unless the filesystem is shared.

Ray workers read the corpus and write outputs where they run. With nodes on more than one host, a local
``--corpus`` is missing on the other hosts and a local ``--output`` (with the embedding cache below it) ends
up scattered over their disks, so the run fails here, naming the path and the node count, unless
``storage.shared_filesystem: true`` says every node mounts the same filesystem (NFS, FSx). Nodes that share
one address are one machine and share its filesystem.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence


class SharedPathError(ValueError):
    """A local path on a multi-host cluster whose filesystem is not declared shared."""


def hosts_of(nodes: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """(alive nodes, distinct host addresses among them) from ``ray.nodes()``."""
    alive = [n for n in nodes if n.get("Alive", True)]
    return len(alive), len({n.get("NodeManagerAddress") for n in alive})


def local_paths(corpus: str, output: str, *, embed_cache: bool, model_cache: Optional[str]) -> dict[str, str]:
    """The run's paths that workers read or write, by what they are, where they are local."""
    paths = {"--corpus": corpus, "--output" + (" (and the embedding cache below it)" if embed_cache else ""): output}
    if model_cache:
        paths["score.cache_dir"] = model_cache
    return {what: path for what, path in paths.items() if "://" not in path or path.startswith("file://")}


def check_shared(paths: Mapping[str, str], nodes: Sequence[Mapping[str, Any]], shared_filesystem: bool) -> None:
    if shared_filesystem or not paths:
        return
    n_nodes, n_hosts = hosts_of(nodes)
    if n_hosts <= 1:
        return
    what, path = next(iter(paths.items()))
    raise SharedPathError(
        f"{what} {path} is a local path but the Ray cluster has {n_nodes} nodes on {n_hosts} hosts: each node "
        "would read and write its own disk. Use s3:// paths, or set storage.shared_filesystem=true if every "
        "node mounts this path from one shared filesystem (NFS, FSx)"
    )
