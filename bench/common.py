"""Helpers shared by the bench scripts: paths relative to the repo root, hashing, tables, machine info."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
# Labelled benchmark data lives beside the repository, never inside it.
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARED_DATA_DISPLAY = "../shared/data/"


def setup_env() -> None:
    """Quiet, offline defaults for the bench process (the same ones the pipeline uses)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from labelnext.ops.core.quiet import quiet_third_party

    quiet_third_party()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def cache_key(*parts: object) -> str:
    """Short stable digest of everything a cached artefact depends on."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:16]


def save_array(path: Path, array) -> None:
    """``np.save`` to a temporary name, then rename: an interrupted run leaves no truncated cache file."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def gpu_description() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    return "no GPU"


def machine_description() -> str:
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem_gib = psutil.virtual_memory().total / 2**30
    cpu = platform.processor() or platform.machine()
    return f"{cores}-core CPU ({cpu}), {mem_gib:.0f} GiB RAM, {gpu_description()}, Python {platform.python_version()}"


def log(message: str) -> None:
    """Progress lines go to stderr so that stdout carries only the result tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` holds the elapsed seconds."""
    box = [0.0]
    start = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - start


def publish(out: Path, text: str) -> None:
    """Write a bench's markdown report to ``out`` and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
